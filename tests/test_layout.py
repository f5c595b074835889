"""The package's dependency direction (docs/trainer.md#dependency-direction): the op library and
the SAE never import the trainer, and the trainer's data readers never load the kernels."""

import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # each test imports the package in a fresh interpreter


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_op_library_and_the_sae_import_nothing_of_the_trainer():
    loaded = run_python(
        "import sys, torch, jumprelu_ext\n"
        "from jumprelu_ext import JumpReLUSAE, jumprelu, jumprelu_l0, step, reference\n"
        "import jumprelu_ext.export\n"
        "print(sorted(m for m in sys.modules if m.startswith('jumprelu_ext.train')))"
    )
    assert loaded == "[]"


def test_reading_activation_files_does_not_load_the_kernels(tmp_path):
    path = tmp_path / "acts.npy"
    np.save(path, np.ones((8, 4), dtype=np.float32))
    loaded = run_python(
        "import sys\n"
        "from jumprelu_ext.train.data.activations import ShuffledBatches, open_activations\n"
        f"store = open_activations({str(path)!r})\n"
        "assert store.rows(range(8)).shape == (8, 4)\n"
        "print(sorted(m for m in sys.modules if m in ('jumprelu_ext._C', 'jumprelu_ext.ops', 'jumprelu_ext.sae')))"
    )
    assert loaded == "[]"


def test_importing_the_ops_registers_the_torch_ops():
    assert run_python("import torch, jumprelu_ext.ops; print(hasattr(torch.ops.jumprelu_ext, 'jumprelu_l0'))") == (
        "True" if run_python("import jumprelu_ext; print(jumprelu_ext.COMPILED)") == "True" else "False"
    )
