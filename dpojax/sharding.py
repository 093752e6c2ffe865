"""Device mesh and the one table that maps logical axis names onto mesh axes.

Model code names the axes of every parameter and key activation with logical names (glossary below);
`Sharder` turns those names into `PartitionSpec`s for a given mesh. The mesh is always passed
explicitly: nothing here reads a global mesh.

Logical axis glossary:
  batch     rows of a batch (chosen and rejected sequences)
  length    sequence positions (split over `context` under context parallelism)
  embed     model width D
  mlp       MLP hidden width F
  heads     query heads H
  kv_heads  key/value heads G
  head_dim  per-head width Dh
  vocab     vocabulary V
  layers    the stacked-layer axis L (never sharded)
  norm      a norm scale vector (never sharded)
  lora_rank the rank r of a LoRA adapter (never sharded)
  expert    the experts X of an MoE layer (expert parallelism: each device of the `expert` axis holds X / expert)
  router    the router's output (one logit per expert; never sharded)

Mesh axes: data (replicas), fsdp (parameter and optimizer-state shards), expert (MoE experts; like data and fsdp it
also splits the batch, so its devices hold different tokens and exchange them with an all-to-all), context (the
positions of a row: `dpojax.models.context`; present only when mesh.context > 1, so a mesh without it is exactly the
four-axis mesh), tensor (heads, MLP width, vocabulary).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpojax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")
CONTEXT_MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")  # the mesh's axes when mesh.context > 1


def mesh_axes(context: int = 1) -> tuple[str, ...]:
    """The mesh's axis names: MESH_AXES, with `context` before `tensor` when mesh.context is not 1."""
    return MESH_AXES if context == 1 else CONTEXT_MESH_AXES

# logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", "context"),  # context parallelism: a row's positions split over `context` (absent: whole)
    ("embed", ("fsdp", "context")),  # parameters also sharded over `context` (its devices hold the same rows)
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),
    ("expert", "expert"),  # experts of an MoE layer (X): expert parallelism
    ("router", None),  # the router's expert scores: never sharded
)


def resolve_mesh_shape(data: int, fsdp: int, tensor: int, n_devices: int, expert: int = 1,
                       context: int = 1) -> tuple[int, ...]:
    """Fill at most one -1 so that data*fsdp*expert*context*tensor == n_devices, or raise a ConfigError; the sizes
    come back in `mesh_axes(context)` order (data, fsdp, expert, tensor; context before tensor when not 1)."""
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "context": context, "tensor": tensor}
    given = " ".join(f"{k}={v}" for k, v in sizes.items())
    axes = mesh_axes(context)
    shape = [sizes[a] for a in axes]
    names, product = "/".join(axes), "*".join(axes)
    if shape.count(-1) > 1:
        raise ConfigError(f"mesh: at most one of mesh.{names} may be -1, got {given}.")
    if any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh: sizes must be positive or -1, got {given}.")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n_devices % known:
            raise ConfigError(
                f"mesh: {n_devices} devices found, which is not divisible by the fixed mesh axes "
                f"(product {known}); set mesh.{names} so their product is {n_devices}."
            )
        shape[shape.index(-1)] = n_devices // known
    if math.prod(shape) != n_devices:
        raise ConfigError(
            f"mesh: {product} = {math.prod(shape)} but {n_devices} devices were found "
            f"({jax.devices()[0].platform}); set the mesh so the product is {n_devices} (use -1 to fill)."
        )
    return tuple(shape)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None, *, expert: int = 1,
              context: int = 1) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over `devices` (default: all devices of all processes); with
    `context` > 1 (or -1) a (data, fsdp, expert, context, tensor) mesh.

    On TPU the devices are laid out along the physical torus (`mesh_utils.create_device_mesh`), so the
    tensor axis, which communicates most, gets the closest neighbours, then the expert axis (all-to-all);
    elsewhere they keep their order. Devices from several TPU slices (multi-slice) form a hybrid mesh whose `data`
    axis spans the slices over DCN, so only data-parallel gradient reductions cross slices; mesh.data must be a
    multiple of them.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(data, fsdp, tensor, len(devices), expert, context)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    try:
        if slices > 1:
            if shape[0] % slices:
                raise ConfigError(
                    f"mesh: the {len(devices)} devices span {slices} TPU slices; mesh.data = {shape[0]} must be a "
                    f"multiple of {slices} so that only the data axis crosses slices."
                )
            ici = (shape[0] // slices, *shape[1:])
            dcn = (slices,) + (1,) * (len(shape) - 1)
            grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
        else:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):  # an unusual TPU slice shape: keep the given order
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, mesh_axes(context))


@dataclasses.dataclass(frozen=True)
class Sharder:
    """Maps logical axis names to shardings on one mesh (hashable, so it can live in a module's graph)."""

    mesh: Mesh
    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...] = DEFAULT_RULES

    def spec(self, names: tuple[str | None, ...], shape: tuple[int, ...] | None = None) -> P:
        """PartitionSpec for logical `names`; a mesh axis is used at most once, and only where it divides."""
        table = dict(self.rules)
        used: set[str] = set()
        out = []
        for i, name in enumerate(names):
            target = table.get(name) if name is not None else None
            axes = (target,) if isinstance(target, str) else tuple(target or ())
            axes = tuple(a for a in axes if a not in used and self.mesh.shape.get(a, 1) > 1)
            if shape is not None and axes:
                size = math.prod(self.mesh.shape[a] for a in axes)
                if shape[i] % size:
                    axes = ()  # e.g. 2 kv heads on a tensor axis of 4: replicate rather than fail
            used.update(axes)
            out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return P(*out)

    @property
    def batch_shards(self) -> int:
        """How many ways the batch axis is split (the devices holding different rows: data * fsdp * expert)."""
        target = dict(self.rules).get("batch")
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        return math.prod(self.mesh.shape.get(a, 1) for a in axes)

    @property
    def experts(self) -> int:
        """The size of the mesh's expert axis (1: no expert parallelism, or a mesh without that axis)."""
        return self.mesh.shape.get("expert", 1)

    @property
    def context(self) -> int:
        """The size of the mesh's context axis (1: every device holds whole rows)."""
        return self.mesh.shape.get("context", 1)

    def named(self, names: tuple[str | None, ...], shape: tuple[int, ...] | None = None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(names, shape))

    def constrain(self, x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, self.named(names, x.shape))


def constrain(x: jax.Array, sharder: Sharder | None, names: tuple[str | None, ...]) -> jax.Array:
    """Sharding constraint on an activation; a no-op only when no mesh was given (sharder is None)."""
    return x if sharder is None else sharder.constrain(x, names)


# --------------------------------------------------------------------------------------------- checks
def unsharded_params(params, mesh: Mesh, axis: str = "fsdp") -> list[tuple[str, tuple[int, ...]]]:
    """(path, shape) of every array in `params` that is not split over mesh axis `axis`, largest first."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        spec = getattr(getattr(x, "sharding", None), "spec", None)
        if spec is None:
            continue
        used = {a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)}
        if axis not in used:
            name = jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")
            out.append((name, tuple(x.shape)))
    return sorted(out, key=lambda item: -math.prod(item[1]))


def check_fsdp_sharded(params, mesh: Mesh, *, tolerance: float = 0.02) -> None:
    """Raise ConfigError when, with mesh.fsdp > 1, parameters left whole on every fsdp device hold more than
    `tolerance` of all parameter elements (MaxText's "sufficiently sharded" check).

    Norm scales are replicated by design (a few D-vectors); a matrix is replicated only when its dimension
    mapped to `fsdp` does not divide by mesh.fsdp, which silently multiplies its memory by mesh.fsdp.
    """
    if mesh.shape.get("fsdp", 1) <= 1:
        return
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    whole = unsharded_params(params, mesh, "fsdp")
    replicated = sum(math.prod(shape) for _, shape in whole)
    if total and replicated / total > tolerance:
        names = ", ".join(f"{p} {list(shape)}" for p, shape in whole[:6])
        raise ConfigError(
            f"mesh: mesh.fsdp={mesh.shape['fsdp']} leaves {replicated / total:.1%} of the parameters unsharded "
            f"(largest: {names}), because their fsdp dimension (usually hidden_size) is not a multiple of "
            f"{mesh.shape['fsdp']}; pick a mesh.fsdp that divides the model's dimensions."
        )
