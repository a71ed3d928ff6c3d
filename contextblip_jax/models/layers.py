"""Building blocks shared by the towers: sharded parameters, dense layers, LayerNorm and attention.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`, `vocab`, ...) as `out_sharding`
metadata; `parallel.py` maps them to mesh axes. Eager sharding is off so that a model can be built without a
mesh (conversion, tests); the train step places the state with explicit shardings instead.

Parameters are float32; `dtype` is the compute dtype. Softmax runs in float32 whatever the compute dtype.

Imports: its own package (`models`) only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Axes = tuple[str | None, ...]
Initializer = Callable[..., jax.Array]

DEFAULT_INIT = nnx.initializers.normal(stddev=0.02)
"""BERT/BLIP's initialiser: N(0, 0.02) kernels, zero biases, unit LayerNorm scales."""


def dotted_path(path: tuple) -> str:
    """A parameter's name in flat dicts and checkpoints: its NNX path joined by dots (`blip.vision.norm.scale`)."""
    return ".".join(str(getattr(part, "key", part)) for part in path)


def param_key(rngs: nnx.Rngs) -> jax.Array:
    """The key `rngs.params()` would return, with the stream's count advanced the same way.

    `rngs.params()` advances its count with `count[...] = ...`, which under tracing (`nnx.eval_shape`, a jitted
    initialisation) asks the new count for its `sharding`; a tracer answers by searching the whole program traced
    so far, so building a model traced takes time quadratic in its parameters, most of it in those searches at
    ViT-B's size. Replacing the count's value instead costs nothing, and the keys are the same.
    """
    stream = rngs.params
    key = jax.random.fold_in(stream.key[...], stream.count[...])
    stream.count.set_value(stream.count[...] + 1)
    return key


class Draws:
    """Stands in for `nnx.Rngs` when building an `nnx.LayerNorm`, `nnx.Conv` or `nnx.Embed`: hands out `count`
    keys drawn beforehand with `param_key` (the keys `rngs.params()` would give, in the same order), so that their
    construction draws cheaply under tracing. `count` is what the module asks for: LayerNorm scale and bias,
    Conv kernel and bias, Embed its table; a module asking for more stops with StopIteration."""

    def __init__(self, rngs: nnx.Rngs, count: int = 2):
        self._keys = iter([param_key(rngs) for _ in range(count)])

    def params(self) -> jax.Array:
        return next(self._keys)


def sharded_param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Axes) -> nnx.Param:
    """A float32 parameter annotated with logical axis names (one per dimension)."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match shape {tuple(shape)}")
    value = init(param_key(rngs), tuple(shape), jnp.float32)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation a checkpoint declares; `gelu` is exact (erf), as in both BLIP sources."""
    functions = {
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
        "relu": jax.nn.relu,
    }
    return functions[name]


class Dense(nnx.Module):
    """`y = x·W + b`, contracting the trailing `in_shape` axes of x into `out_shape`.

    Multi-axis shapes keep attention heads as their own axis (`[embed] -> [heads, kv]`), so that tensor
    parallelism can shard heads without reshapes. `precision` is the matmul's (`jax.lax.dot_general`); None is the
    platform's default, which may round float32 inputs (TF32 on NVIDIA GPUs, bfloat16 passes on TPUs).
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        out_shape: Sequence[int],
        axes: Axes,
        *,
        use_bias: bool = True,
        dtype: jnp.dtype = jnp.float32,
        precision: jax.lax.Precision | None = None,
        rngs: nnx.Rngs,
        kernel_init: Initializer = DEFAULT_INIT,
    ):
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(out_shape)
        self.dtype = dtype
        self.precision = precision
        self.kernel = sharded_param(rngs, kernel_init, self.in_shape + self.out_shape, axes)
        out_axes = axes[len(self.in_shape) :]
        self.bias = sharded_param(rngs, nnx.initializers.zeros, self.out_shape, out_axes) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        kernel = self.kernel[...].astype(self.dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel, (contract, ((), ())), precision=self.precision)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


def conv(in_features: int, out_features: int, kernel: int, *, dtype: jnp.dtype, rngs: nnx.Rngs, **options) -> nnx.Conv:
    """A square NHWC convolution whose output channels are the `embed` axis (float32 parameters).
    `options` go to `nnx.Conv` (strides, padding, feature_group_count)."""
    return nnx.Conv(
        in_features,
        out_features,
        kernel_size=(kernel, kernel),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(DEFAULT_INIT, (None, None, None, "embed"), eager_sharding=False),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",), eager_sharding=False),
        rngs=Draws(rngs, 2 if options.get("use_bias", True) else 1),  # type: ignore[arg-type]
        **options,
    )


def float32_head(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> Dense:
    """`Linear(in -> out)` computed in float32 at full matmul precision whatever the model's compute dtype, for
    the heads whose logits rank candidates (ITM, scoring). bfloat16's spacing between logits of 2 and 8 is 0.016 to
    0.03, enough to tie near-identical video frames; the authors score in float32. Its input is cast up, so a
    bfloat16 feature is read exactly; its parameters are float32 like every other."""
    return Dense(
        (in_features,),
        (out_features,),
        ("embed", None),
        dtype=jnp.float32,
        precision=jax.lax.Precision.HIGHEST,
        rngs=rngs,
    )


def _linear_layers(module: nnx.Module) -> list[tuple[nnx.Param, nnx.Param | None, int]]:
    """(kernel, bias or None, fan_in) of every `Dense` and `nnx.Conv` under `module`, in graph order. A convolution's
    fan-in is its kernel's size over the input channels of one group, as PyTorch counts it."""
    layers = []
    for _, node in nnx.iter_graph(module):
        if isinstance(node, Dense):
            layers.append((node.kernel, node.bias, math.prod(node.in_shape)))
        elif isinstance(node, nnx.Conv):
            layers.append((node.kernel, node.bias, math.prod(node.kernel.shape[:-1])))
    return layers


def _redraw(
    targets: Sequence[tuple[nnx.Param, float]],
    draw: Callable[[jax.Array, tuple[int, ...]], jax.Array],
    key: jax.Array,
) -> None:
    """Sets the i-th target parameter to `draw(fold_in(key, i), its shape)` divided by its divisor.

    Each parameter is drawn in its own shape from its own key, so nothing the size of all the targets is built:
    jitted with sharded outputs (`parallel.init_sharded`), each draw is generated in its shards, threefry being
    partitionable. One flat draw sliced over the parameters made XLA materialise the whole draw on every device
    and reshard each slice through a whole copy: temporaries the size of every target on each device, however
    the parameters are sharded. Eagerly, each distinct shape compiles its draw once, as `DEFAULT_INIT`'s do."""
    for index, (param, divisor) in enumerate(targets):
        unit = draw(jax.random.fold_in(key, index), tuple(param.shape))
        param[...] = unit / np.float32(divisor)


def _uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, -1, 1)


def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32)


def redraw_fan_in(module: nnx.Module, rngs: nnx.Rngs) -> None:
    """Redraws every dense and convolution kernel under `module` from U(±1/sqrt(fan_in)), PyTorch's default for
    `nn.Linear` and `nn.Conv2d` (biases stay zero).

    N(0, 0.02) suits BERT's width 768, where a kernel keeps about half of a signal's size (0.02·sqrt(768) ≈ 0.55);
    at width 128 it keeps a quarter (0.23), so a model built small from scratch starts with branches that barely
    reach the residual stream (the ITM pass sees the image through two such kernels). U(±1/sqrt(fan_in)) keeps
    0.58 at every width."""
    kernels = [(kernel, math.sqrt(fan_in)) for kernel, _, fan_in in _linear_layers(module)]
    _redraw(kernels, _uniform, param_key(rngs))


def redraw_torch(modules: Sequence[nnx.Module | None], tables: Sequence[nnx.Param], rngs: nnx.Rngs) -> None:
    """Draws what PyTorch's constructors draw: every dense and convolution layer under `modules` (None: an absent
    part) as `nn.Linear` and `nn.Conv2d` do, kernel and bias from U(±1/sqrt(fan_in)) (`kaiming_uniform_` with
    a=sqrt(5), and their bias rule); every parameter of `tables` from N(0, 1), as `nn.Embedding` and `torch.randn`.
    LayerNorms are left as built, ones and zeros, as `nn.LayerNorm`. Each parameter is drawn in its own shape from
    its own key (`_redraw`): the dense layers' keys folded from one key of `rngs`, the tables' from the next."""
    layers = [layer for module in modules if module is not None for layer in _linear_layers(module)]
    uniform = [(kernel, math.sqrt(fan_in)) for kernel, _, fan_in in layers]
    uniform += [(bias, math.sqrt(fan_in)) for _, bias, fan_in in layers if bias is not None]
    _redraw(uniform, _uniform, param_key(rngs))
    _redraw([(table, 1.0) for table in tables], _normal, param_key(rngs))


def layer_norm(width: int, eps: float, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """LayerNorm over the last axis with the source checkpoint's epsilon (1e-6 ViT, 1e-12 BERT, ...)."""
    meta = {"out_sharding": ("embed",), "eager_sharding": False}
    return nnx.LayerNorm(
        width,
        epsilon=eps,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_metadata=meta,
        bias_metadata=meta,
        rngs=Draws(rngs),  # type: ignore[arg-type]
    )


ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")
"""How self-attention is computed. `einsum`: the explicit product, float32 softmax and product again, whose
probabilities TMIM can read. `xla` and `cudnn`: `jax.nn.dot_product_attention`, which never hands the
probabilities back, so XLA may fuse them away; `cudnn` is cuDNN's fused (flash) attention kernel on NVIDIA GPUs
(bfloat16 or float16 only, and no CPU or TPU kernel). Dropout on the probabilities keeps the `einsum` path.
`einsum` is the default because it is the one TMIM can read and no slower on a CPU; how the others compare on
accelerators is in `docs/benchmarks/` where it has been measured."""


def gather_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """Rows of `x` [R, ...] picked per group: `rows` [G, M] indexes within each of G equal blocks of x's rows, and
    the result is [G * M, ...] in group order.

    Why per group: when the leading axis is split over the devices in G blocks, each group's rows come from its
    own block, and the gather is batched over G, so every device reads only what it holds (no rows travel)."""
    groups = rows.shape[0]
    if x.shape[0] % groups:
        raise ValueError(f"{x.shape[0]} rows cannot be split into {groups} groups")
    blocks = x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
    picked = jax.vmap(lambda block, index: jnp.take(block, index, axis=0))(blocks, rows)
    return picked.reshape(groups * rows.shape[1], *x.shape[1:])


class AttentionProbe(nnx.Variable):
    """Zeros added to one attention's probabilities, so that a score's gradient with respect to those
    probabilities is this variable's gradient (`models/gradcam.py` sets it for one call and removes it)."""


class MultiHeadAttention(nnx.Module):
    """Scaled dot-product attention with separate q/k/v projections and an output projection.

    Keys and values may come from another sequence of a different width (cross-attention to image tokens).
    The probabilities can be returned: TMIM chooses its mask from the cross-attention maps. `probe` (None
    unless a heatmap is being computed) is an `AttentionProbe` the shape of the probabilities, added to them.
    """

    def __init__(
        self,
        width: int,
        num_heads: int,
        *,
        kv_width: int | None = None,
        dropout: float = 0.0,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        head_dim = width // num_heads
        kv_width = kv_width or width
        heads = (num_heads, head_dim)
        self.scale = head_dim**-0.5
        self.dtype = dtype
        self.query = Dense((width,), heads, ("embed", "heads", "kv"), dtype=dtype, rngs=rngs)
        self.key = Dense((kv_width,), heads, ("embed", "heads", "kv"), dtype=dtype, rngs=rngs)
        self.value = Dense((kv_width,), heads, ("embed", "heads", "kv"), dtype=dtype, rngs=rngs)
        self.out = Dense(heads, (width,), ("heads", "kv", "embed"), dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.implementation = "einsum"  # see ATTENTION_IMPLEMENTATIONS; set on a built model (`set_attention`)
        self.probe: AttentionProbe | None = nnx.data(None)

    def project(self, x: jax.Array, context: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values [B, S, heads, head_dim]. In self-attention the three projections run as one
        matrix product over their kernels stacked at compute time: the same parameters (and checkpoint names),
        one pass over x instead of three (the base train step on this CPU: 4.8% faster at 1 description, within the
        3% spread at 2; a larger product for accelerators)."""
        if context is not None:
            return self.query(x), self.key(context), self.value(context)
        parts = (self.query, self.key, self.value)
        kernel = jnp.stack([part.kernel[...] for part in parts], axis=1).astype(self.dtype)  # [width, 3, heads, hd]
        bias = jnp.stack([part.bias[...] for part in parts]).astype(self.dtype)  # [3, heads, hd]
        qkv = jnp.einsum("bsw,wthd->bsthd", x.astype(self.dtype), kernel, precision=self.query.precision) + bias
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        key_mask: jax.Array | None = None,
        rngs: nnx.Rngs | None = None,
        context_rows: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Attends from `x` [B, Q, width] to `context` [B, K, kv_width] (default: x itself).

        `key_mask` [B, K] is true where a key may be attended to (padding is false). `rngs` switches dropout on
        (BERT's attention-probability dropout); without it the layer is deterministic.
        `context_rows` [G, B / G] shares a context between queries: `context` and `key_mask` then hold one row per
        distinct context (an image), its keys and values are projected once per row, and query row i reads the
        row `gather_rows` picks for it (the same numbers as repeating the context, at a fraction of the work).
        Returns the projected output [B, Q, width] and the float32 probabilities [B, heads, Q, K] (before dropout);
        a fused implementation never forms the probabilities and returns None in their place.
        """
        q, k, v = self.project(x, context)
        if context_rows is not None:
            k, v = gather_rows(k, context_rows), gather_rows(v, context_rows)
            key_mask = None if key_mask is None else gather_rows(key_mask, context_rows)
        if self.implementation != "einsum" and (rngs is None or self.dropout.rate == 0):
            mask = None if key_mask is None else key_mask.astype(bool)[:, None, None, :]
            mixed = jax.nn.dot_product_attention(
                q, k, v, mask=mask, scale=self.scale, implementation=self.implementation
            )
            return self.out(mixed), None
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * self.scale
        if key_mask is not None:
            visible = key_mask.astype(bool)[:, None, None, :]
            logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        if self.probe is not None:
            probs = probs + self.probe[...]
        dropped = self.dropout(probs, deterministic=rngs is None, rngs=rngs)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(self.dtype), v)
        return self.out(mixed), probs
