"""A JumpReLU sparse autoencoder built on the fused ``jumprelu_l0`` op (docs/method.md)."""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .ops import jumprelu_l0
from .sparse import SparseActs, sparse_decode, sparse_encode, support_density
from .step_policy import StepPolicy

SPARSITY_LOSSES = ("step", "tanh")

# The initial decoder is drawn in fixed blocks of rows, each from its own generator, so a range
# of features can be drawn without the rest: a feature-sharded rank draws just its shard, equal
# to the same rows of the whole SAE, and never holds the whole matrix.
INIT_BLOCK_ROWS = 1024


def initial_decoder_rows(seed: int, first: int, count: int, d_in: int) -> torch.Tensor:
    """Rows first … first+count−1 of the initial decoder: random unit vectors, fp32 on the CPU."""
    rows = []
    for block in range(first // INIT_BLOCK_ROWS, (first + count - 1) // INIT_BLOCK_ROWS + 1):
        drawn = torch.randn(INIT_BLOCK_ROWS, d_in, generator=torch.Generator().manual_seed(seed * 1_000_003 + block))
        start = block * INIT_BLOCK_ROWS
        rows.append(drawn[max(first - start, 0) : min(first + count - start, INIT_BLOCK_ROWS)])
    w = torch.cat(rows)
    return w / w.norm(dim=1, keepdim=True)


class SAEOutput(NamedTuple):
    reconstruction: torch.Tensor
    acts: torch.Tensor | SparseActs  # dense [..., d_sae], or row-compressed from the sparse step
    l0: torch.Tensor


class SAELoss(NamedTuple):
    total: torch.Tensor
    mse: torch.Tensor
    l0: torch.Tensor  # mean active features per row (what is logged, whatever the penalty)
    sparsity: torch.Tensor  # the penalty λ multiplies
    pre_act: torch.Tensor
    output: SAEOutput
    step: str = "dense"  # which step computed it: "dense" or "sparse" (docs/ops.md#the-sparse-step)
    support_density: float | None = None  # active-or-window fraction of [rows, d_sae], when measured


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"JumpReLUSAE: {name} must be a positive int, got {value!r}")


def _check_positive_float(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"JumpReLUSAE: {name} must be a positive finite number, got {value!r}")


class JumpReLUSAE(nn.Module):
    """x̂ = JumpReLU_θ(x @ W_enc + b_enc) @ W_dec + b_dec, with θ > 0 one per feature.

    θ is stored as ``log_threshold`` (θ = exp(log_threshold), the paper's choice) or, with
    threshold_param="raw", as ``threshold`` directly. θ is always fp32, whatever ``dtype``
    the weights use: a bf16 θ stops learning (its updates round away). The initial weights
    depend on torch's global seed; ``first_feature`` makes this module features
    first_feature … first_feature+d_sae−1 of a wider SAE drawn from the same seed (sharding).
    ``ste_to_input=True`` lets the straight-through term reach pre (and so the encoder) as well.
    ``encoder_init_scale`` multiplies the initial encoder (W_enc = scale · W_decᵀ).
    ``apply_b_dec_to_input=True`` encodes x − b_dec instead of x (SAELens's option of that name;
    measured better, docs/method.md#ablations); export folds it into b_enc.
    ``step``: "auto" (default), "sparse" or "dense", the step ``loss`` takes (docs/ops.md#the-sparse-step).
    """

    def __init__(
        self,
        d_in,
        d_sae,
        bandwidth=1e-3,
        init_threshold=1e-3,
        threshold_param="log",
        device=None,
        dtype=None,
        first_feature=0,
        ste_to_input=False,
        encoder_init_scale=1.0,
        apply_b_dec_to_input=False,
        step="auto",
    ):
        super().__init__()
        _check_positive_int("d_in", d_in)
        _check_positive_int("d_sae", d_sae)
        _check_positive_float("bandwidth", bandwidth)
        _check_positive_float("init_threshold", init_threshold)
        _check_positive_float("encoder_init_scale", encoder_init_scale)
        if threshold_param not in ("log", "raw"):
            raise ValueError(f"JumpReLUSAE: threshold_param must be 'log' or 'raw', got {threshold_param!r}")
        self.d_in, self.d_sae = d_in, d_sae
        self.bandwidth = float(bandwidth)
        self.threshold_param = threshold_param
        if not isinstance(ste_to_input, bool):
            raise ValueError(f"JumpReLUSAE: ste_to_input must be a bool, got {ste_to_input!r}")
        # The straight-through term also reaches pre (Anthropic 2025; docs/ops.md#ste_to_input).
        self.ste_to_input = ste_to_input
        if not isinstance(apply_b_dec_to_input, bool):
            raise ValueError(f"JumpReLUSAE: apply_b_dec_to_input must be a bool, got {apply_b_dec_to_input!r}")
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.step_policy = StepPolicy(step)
        dtype = dtype if dtype is not None else torch.get_default_dtype()

        # Decoder rows are random unit vectors and the encoder starts as their transpose, times
        # encoder_init_scale (the paper: 1; the trainer's default recipe: 0.1, which starts the SAE
        # near a sensible reconstruction instead of ~15x too large; docs/method.md#ablations).
        # Drawn and normalised in fp32 so that low-precision weights start as close to unit as they can.
        seed = int(torch.randint(0, 2**31, ()).item())
        if torch.device(device or "cpu").type == "meta":  # a shell whose weights will be assigned
            w_dec = torch.empty(d_sae, d_in, device="meta")
        else:
            w_dec = initial_decoder_rows(seed, first_feature, d_sae, d_in).to(device)
        self.W_dec = nn.Parameter(w_dec.to(dtype))
        self.W_enc = nn.Parameter((w_dec.t() * encoder_init_scale).contiguous().to(dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))

        theta = torch.full((d_sae,), float(init_threshold), device=device, dtype=torch.float32)
        if threshold_param == "log":
            self.log_threshold = nn.Parameter(theta.log())
        else:
            self.threshold = nn.Parameter(theta)

    @property
    def threshold(self) -> torch.Tensor:
        """θ in fp32 (differentiable: exp of log_threshold, or the raw parameter)."""
        if self.threshold_param == "log":
            return self.log_threshold.float().exp()
        # In raw mode the parameter shares this name: nn.Module keeps it in _parameters, and
        # the property reads it from there. AttributeError (not KeyError) before it is registered,
        # so that register_parameter's hasattr() check passes.
        p = self._parameters.get("threshold")
        if p is None:
            raise AttributeError("threshold")
        return p.float()

    def encode(self, x: torch.Tensor, fire_counts: torch.Tensor | None = None):
        """x [..., d_in] -> (acts [..., d_sae], l0 [...]); fire_counts as in ``activate``."""
        return self.activate(self.pre_acts(x), fire_counts)

    def activate(self, pre: torch.Tensor, fire_counts: torch.Tensor | None = None):
        """pre [..., d_sae] -> (JumpReLU acts, per-row L0), fused in one op. With ``fire_counts``
        (int64 [d_sae] on the SAE's device) the same pass adds each feature's count of rows with
        acts != 0 to it: firing statistics without another pass over acts (docs/ops.md#fire-counts)."""
        return jumprelu_l0(pre, self.threshold, self.bandwidth, self.ste_to_input, fire_counts)

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W_enc + b_enc (or (x − b_dec) @ W_enc + b_enc), after checking the input's width."""
        self._check_width(x)
        if self.apply_b_dec_to_input:
            x = x - self.encoder_b_dec()
        # F.linear (not `x @ W + b`) so autocast runs the whole affine map in its low-precision
        # dtype; an fp32 bias added afterwards would promote pre back to fp32.
        return F.linear(x, self.W_enc.t(), self.b_enc)

    def _check_width(self, x: torch.Tensor) -> None:
        if x.dim() < 1 or x.shape[-1] != self.d_in:
            got = x.shape[-1] if x.dim() >= 1 else "a 0-d tensor"
            raise ValueError(f"JumpReLUSAE: expected input with last dimension d_in={self.d_in}, got {got}")

    def encoder_b_dec(self) -> torch.Tensor:
        """b_dec as the encoder sees it (a feature-sharded SAE sums its gradient over ranks)."""
        return self.b_dec

    def sum_over_features(self, per_row: torch.Tensor) -> torch.Tensor:
        """A per-row sum over this module's features is the sum over all of them (a
        feature-sharded SAE adds the other ranks' parts here)."""
        return per_row

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        return F.linear(acts, self.W_dec.t(), self.b_dec)

    def decode_sparse(self, acts: SparseActs) -> torch.Tensor:
        """``decode`` of the sparse step's activations: [rows, d_in] from the support alone."""
        return sparse_decode(acts, self.W_dec) + self.b_dec

    def forward(self, x: torch.Tensor, fire_counts: torch.Tensor | None = None) -> SAEOutput:
        acts, l0 = self.encode(x, fire_counts)
        return SAEOutput(self.decode(acts), acts, l0)

    def loss(
        self,
        x: torch.Tensor,
        l0_coefficient: float,
        sparsity_loss: str = "step",
        tanh_scale: float = 4.0,
        pre_act_loss_coefficient: float = 0.0,
        num_rows: int | None = None,
        fire_counts: torch.Tensor | None = None,
        step: str | None = None,
    ) -> "SAELoss":
        """total = mse + λ·sparsity (+ pre-act term); every term a mean over rows, reduced in fp32.

        mse is ‖x − x̂‖² summed over d_in. sparsity is the L0 (``"step"``, the paper: reaches θ
        only through the op's straight-through estimator) or Anthropic's 2025 smooth penalty
        Σ_i tanh(c·f_i·‖W_dec,i‖) (``"tanh"``). The pre-activation term
        Σ_i ReLU(θ_i − pre_i)·‖W_dec,i‖ pulls features that never fire back toward their
        threshold; it is only computed when its coefficient is non-zero. Means divide by
        ``num_rows`` (default: this batch's rows; data-parallel training passes the global count).
        ``fire_counts``: as in ``activate`` (the trainer passes its ``FiringTracker.counts``).
        ``step``: "dense" or "sparse" for this call; None: the module's ``step`` policy decides
        (the pre-activation loss needs every entry, so it is always dense).
        """
        if sparsity_loss not in SPARSITY_LOSSES:
            raise ValueError(f"JumpReLUSAE.loss: sparsity_loss must be one of {SPARSITY_LOSSES}, got {sparsity_loss!r}")
        policy = self.step_policy if step is None else StepPolicy(step)
        path = policy.choose(needs_every_entry=bool(pre_act_loss_coefficient))
        n = x.shape[:-1].numel() if num_rows is None else num_rows  # rows = every leading index

        def mean(per_row):
            return per_row.float().sum() / n

        if sparsity_loss == "tanh" or pre_act_loss_coefficient:
            dec_norms = self.W_dec.float().norm(dim=1)
        if path == "sparse":
            out, density = self._sparse_forward(x, fire_counts)
        else:
            pre = self.pre_acts(x)
            acts, l0 = self.activate(pre, fire_counts)
            out = SAEOutput(self.decode(acts), acts, l0)
            density = support_density(pre, self.threshold, self.bandwidth) if policy.wants_density(path) else None
        policy.observe(path, density)

        mse = mean((x.float() - out.reconstruction.float()).pow(2).sum(-1))
        l0_mean = mean(out.l0)
        if sparsity_loss == "step":
            sparsity = l0_mean
        elif path == "sparse":  # the same per-row sums over the support alone
            acts = out.acts
            tanh = torch.tanh(tanh_scale * acts.values.float().abs() * dec_norms[acts.indices])
            sparsity = mean(self.sum_over_features(acts.row_sums(tanh).view(x.shape[:-1])))
        else:
            sparsity = mean(self.sum_over_features(torch.tanh(tanh_scale * out.acts.float().abs() * dec_norms).sum(-1)))
        total = mse + l0_coefficient * sparsity
        pre_act = torch.zeros((), device=mse.device)
        if pre_act_loss_coefficient:
            pre_act = mean(self.sum_over_features((F.relu(self.threshold.detach() - pre.float()) * dec_norms).sum(-1)))
            total = total + pre_act_loss_coefficient * pre_act
        return SAELoss(total, mse, l0_mean, sparsity, pre_act, out, path, density)

    def _sparse_forward(self, x: torch.Tensor, fire_counts) -> tuple[SAEOutput, float]:
        """The sparse step's forward (docs/ops.md#the-sparse-step): the support of the activations
        row-compressed, the reconstruction from it, and the support's density."""
        self._check_width(x)
        rows = x.reshape(-1, self.d_in)
        if self.apply_b_dec_to_input:
            rows = rows - self.encoder_b_dec()
        W_enc, b_enc = self.W_enc, self.b_enc
        if torch.is_autocast_enabled(rows.device.type):  # as F.linear under autocast: its dtype
            dtype = torch.get_autocast_dtype(rows.device.type)
            rows, W_enc, b_enc = rows.to(dtype), W_enc.to(dtype), b_enc.to(dtype)
        acts = sparse_encode(rows, W_enc, b_enc, self.threshold, self.bandwidth, self.ste_to_input, fire_counts)
        # l0 before the reconstruction: a feature-sharded SAE sums both over ranks, in the dense
        # step's order, so ranks on different steps still meet in the same collectives.
        l0 = self.sum_over_features(acts.l0).view(x.shape[:-1])
        reconstruction = self.decode_sparse(acts).view(*x.shape[:-1], self.d_in)
        return SAEOutput(reconstruction, acts, l0), acts.density(self.d_sae)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self):
        """Project out of W_dec.grad each row's component along that row (call before the step),
        so the step moves rows along the unit sphere rather than changing their norms."""
        if self.W_dec.grad is None:
            return
        for w, g in zip(*(t.split(self._rows_per_block()) for t in (self.W_dec, self.W_dec.grad))):
            wf = w.float()
            coef = (g.float() * wf).sum(1, keepdim=True) / wf.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
            g.sub_((coef * wf).to(g.dtype))

    @torch.no_grad()
    def normalize_decoder(self):
        """Renormalise W_dec rows to unit norm (call after the step): the L0 penalty would
        otherwise be dodged by shrinking encoder activations while growing decoder rows."""
        for w in self.W_dec.split(self._rows_per_block()):
            norms = torch.linalg.vector_norm(w, dim=1, keepdim=True, dtype=torch.float32).clamp_min(1e-12)
            if w.dtype == torch.float32:
                w.div_(norms)  # in place: the same values as w / norms, without the copy
            else:
                w.copy_(w.float() / norms)

    def _rows_per_block(self) -> int:
        """The decoder constraint works on blocks of about 4 MB: each row's result is the same, and
        the temporaries stay in cache instead of costing a pass over [d_sae, d_in] each (half the
        time at d_sae 65,536, where the sparse step leaves these a large share of a step)."""
        return max(1, 2**20 // self.d_in)

    def extra_repr(self):
        return (
            f"d_in={self.d_in}, d_sae={self.d_sae}, bandwidth={self.bandwidth}, "
            f"threshold_param={self.threshold_param!r}, apply_b_dec_to_input={self.apply_b_dec_to_input}"
        )
