"""Channel-flow analysis of a model: which channel dimensions can be split between workers.

The model is traced with torch.fx (timm's own no-trace modules and functions are kept as leaves),
shapes are propagated with an example input, and every tensor's channel dimension (dim 1) is then
followed from the conv/linear that produced it through the ops that consume it. Channels that flow
through the same ops form one *channel space*. A space can be split when every op it reaches treats
channels independently (norms per channel, activations, pooling, depthwise or grouped convs along
whole conv groups, squeeze-excite gates) and it ends only in conv/linear inputs. A residual add, a
concat, a reshape that folds channels away, a norm that mixes channels, an unknown op or the model
output make it shared, and the reason is recorded.

Why hand-written on torch.fx rather than torch-pruning's DependencyGraph: LoFT needs, for each space,
the exact (tensor, dim, unit size) triples *and* the reason a space may not be split; DepGraph groups
residual streams and SE gates the same way ("several producers") and has no notion of "forbidden by
an add", so its groups would have to be re-classified op by op anyway.
"""
from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field, replace

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp
from loft_ext.errors import ConfigError

try:  # timm registers modules/functions that symbolic tracing must not enter
    from timm.layers._fx import get_notrace_functions, get_notrace_modules
except ImportError:  # pragma: no cover - timm is a hard dependency; keep the analysis importable
    def get_notrace_modules():
        return []

    def get_notrace_functions():
        return []

try:
    from timm.layers import DropPath
except ImportError:  # pragma: no cover
    DropPath = ()

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.AlphaDropout, nn.Softplus,
)
_POOL_MODULES = (
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.Flatten,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu,
    F.elu, F.mish, F.hardtanh, F.dropout, F.dropout2d, F.softplus, torch.relu, torch.relu_,
    torch.sigmoid, torch.tanh, torch.clamp, torch.clip, operator.neg, torch.neg,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min",
    "clamp_min_", "clamp_max", "clamp_max_", "clip", "clip_", "contiguous", "clone", "float",
    "half", "bfloat16", "to", "type_as", "neg", "detach", "hardsigmoid", "exp", "abs",
}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_RESHAPE_OPS = {"flatten", "view", "reshape"}
_ADD_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul}
_MUL_METHODS = {"mul", "mul_"}
_DIV_FUNCTIONS = {operator.truediv, operator.itruediv, torch.div}
_DIV_METHODS = {"div", "div_"}
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.stack}
# ops that cut a tensor into pieces (a tuple of tensors, or one piece for narrow / slicing)
_SPLIT_FUNCTIONS = {torch.split, torch.chunk, torch.tensor_split, torch.narrow, torch.unbind,
                    torch.split_with_sizes, torch.hsplit, torch.vsplit, torch.dsplit}
_SPLIT_METHODS = {"split", "chunk", "tensor_split", "narrow", "unbind", "split_with_sizes",
                  "unsafe_split", "hsplit", "vsplit", "dsplit"}


@dataclass(frozen=True)
class TensorDim:
    """One dimension of one tensor (parameter or buffer) that a channel space runs along."""

    name: str       # state_dict key, e.g. "layer1.0.conv1.weight"
    dim: int        # the dimension indexed by the space's channels
    size: int       # full size of that dimension
    role: str       # producer | norm | consumer | grouped | gate
    buffer: bool = False


@dataclass
class ChannelSpace:
    """Channels that flow together through the graph (one conv/linear output and what follows)."""

    ident: int
    producer: str                            # module that creates the channels ("" for input)
    channels: int
    dims: list[TensorDim] = field(default_factory=list)
    grouped_convs: dict[str, int] = field(default_factory=dict)   # module -> conv groups
    norm_groups: dict[str, int] = field(default_factory=dict)     # GroupNorm module -> groups
    gates: list[str] = field(default_factory=list)                # producers joined by a multiply
    consumers: list[str] = field(default_factory=list)
    barriers: list[str] = field(default_factory=list)             # why it cannot be split

    @property
    def units(self) -> int:
        """Number of indivisible channel units: whole conv / norm groups, else single channels."""
        u = self.channels
        for g in list(self.grouped_convs.values()) + list(self.norm_groups.values()):
            u = math.gcd(u, g)
        return u


class _Tracer(fx.Tracer):
    """fx tracer that keeps convs, linears, norms and timm's no-trace modules as leaves."""

    def __init__(self):
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self._leaves = tuple(get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._NormBase,
                          nn.GroupNorm, nn.LayerNorm) + self._leaves):
            return True
        if DropPath and isinstance(m, DropPath):
            return True
        return super().is_leaf_module(m, qualname)


def trace(model: nn.Module, input_shape: tuple[int, ...]) -> fx.GraphModule:
    """Symbolically trace ``model`` and annotate every node with its output shape."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds of errors for untraceable Python
        raise PartitionError(
            f"{type(model).__name__} cannot be traced with torch.fx ({type(exc).__name__}: {exc}); "
            "loft_ext can only split models whose forward is traceable (timm CNNs are)") from exc
    gm = fx.GraphModule(tracer.root, graph)
    # the example input lives where the model does (a model already moved to the GPU is planned there)
    device = next(itertools.chain(model.parameters(), model.buffers()), torch.zeros(())).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:  # eagerly first: ShapeProp prints a traceback of its own before raising
                model(torch.zeros(input_shape, device=device))
            except Exception as exc:  # e.g. a ViT whose patch embedding asserts a fixed input size
                first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                raise PartitionError(f"{type(model).__name__} does not run on an input of shape "
                                     f"{tuple(input_shape)} ({first.strip()[:300]}); pass an --image_size the "
                                     "model accepts") from None
            try:
                ShapeProp(gm).propagate(torch.zeros(input_shape, device=device))
            except Exception as exc:  # the model runs eagerly, but its traced graph does not
                first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                raise PartitionError(
                    f"{type(model).__name__}'s torch.fx graph does not run on an input of shape "
                    f"{tuple(input_shape)} ({first.strip()[:300]}): its forward depends on Python "
                    "control flow or values fx cannot follow, so loft_ext cannot analyse it") from None
    finally:
        model.train(was_training)
    return gm


class PartitionError(ConfigError):
    """A model, preset or worker count that cannot be partitioned; the message says why and what works."""


def _shape(node) -> torch.Size | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def _is_elementwise_module(m: nn.Module) -> bool:
    if isinstance(m, _ELEMENTWISE_MODULES + _POOL_MODULES):
        return True
    if DropPath and isinstance(m, DropPath):
        return True
    return False


def _norm_act_is_per_channel(m: nn.Module) -> bool:
    """timm's BatchNormAct2d/GroupNormAct carry an activation and dropout inside the norm."""
    for sub_name in ("act", "drop"):
        sub = getattr(m, sub_name, None)
        if sub is not None and not _is_elementwise_module(sub):
            return False
    return True


def _piece_shapes(node: fx.Node) -> list[torch.Size]:
    """Output shapes of a node returning a tuple/list of tensors (e.g. torch.split)."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)):
        return [m.shape for m in meta if hasattr(m, "shape")]
    return []


def _op_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


class _Analysis:
    def __init__(self, model: nn.Module, gm: fx.GraphModule, model_name: str | None = None):
        self.model = model
        self.model_name = model_name or type(model).__name__
        self.gm = gm
        self.modules = dict(model.named_modules())
        self.spaces: list[ChannelSpace] = []
        self.parent: list[int] = []
        self.space_of: dict[fx.Node, int] = {}
        self.claims: dict[tuple[str, int], int] = {}

    # union-find over spaces -------------------------------------------------------------------
    def new_space(self, producer: str, channels: int) -> int:
        ident = len(self.spaces)
        self.spaces.append(ChannelSpace(ident=ident, producer=producer, channels=channels))
        self.parent.append(ident)
        return ident

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int, gate: bool = False) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        keep, drop = (a, b) if a < b else (b, a)
        self.parent[drop] = keep
        sk, sd = self.spaces[keep], self.spaces[drop]
        if gate:  # the gate's producer rows scale the kept space's channels
            sd.dims = [replace(d, role="gate") if d.role == "producer" else d for d in sd.dims]
        sk.dims += sd.dims
        sk.grouped_convs.update(sd.grouped_convs)
        sk.norm_groups.update(sd.norm_groups)
        sk.gates += ([sd.producer] if gate else []) + sd.gates
        sk.consumers += sd.consumers
        sk.barriers += sd.barriers
        if sk.channels != sd.channels:
            sk.barriers.append(f"joins {sk.channels} and {sd.channels} channels")
        return keep

    def barrier(self, s: int | None, reason: str) -> None:
        if s is not None:
            space = self.spaces[self.find(s)]
            if reason not in space.barriers:
                space.barriers.append(reason)

    def add_dim(self, s: int, name: str, tensor: torch.Tensor, dim: int, role: str, buffer=False):
        s = self.find(s)
        self.spaces[s].dims.append(TensorDim(name, dim, int(tensor.shape[dim]), role, buffer))
        key = (name, dim)
        if key in self.claims and self.find(self.claims[key]) != s:
            self.barrier(s, f"{name} is used by two channel groups")
            self.barrier(self.claims[key], f"{name} is used by two channel groups")
        self.claims[key] = s

    def produce(self, name: str, m: nn.Module, channels: int) -> int:
        """A new space made by the output rows (and bias) of conv/linear ``m``."""
        s = self.new_space(name, channels)
        self.add_dim(s, name + ".weight", m.weight, 0, "producer")
        if m.bias is not None:
            self.add_dim(s, name + ".bias", m.bias, 0, "producer")
        return s

    def consume(self, s: int, name: str, m: nn.Module) -> None:
        """Conv/linear ``m`` reads space ``s`` through its weight columns."""
        self.add_dim(s, name + ".weight", m.weight, 1, "consumer")
        self.spaces[self.find(s)].consumers.append(name)

    def space(self, node) -> int | None:
        if isinstance(node, fx.Node) and node in self.space_of:
            return self.find(self.space_of[node])
        return None

    # node rules -------------------------------------------------------------------------------
    def run(self) -> list[ChannelSpace]:
        for node in self.gm.graph.nodes:
            try:
                self.visit(node)
            except PartitionError:
                raise
            except Exception as exc:  # never a traceback from the analysis: one sentence naming the op
                op = node.target if isinstance(node.target, str) else _op_name(node)
                raise PartitionError(
                    f"the channel analysis of {self.model_name} failed at graph node {node.name!r} "
                    f"({node.op} {op}): {type(exc).__name__}: {str(exc).strip()[:200]}; this model "
                    "cannot be partitioned (use S=1, or report the model)") from exc
        roots = sorted({self.find(i) for i in range(len(self.spaces))})
        return [self.spaces[r] for r in roots]

    def visit(self, node: fx.Node) -> None:
        out = None
        if node.op == "placeholder":
            shape = _shape(node)
            if shape is not None and len(shape) >= 2:
                out = self.new_space("", int(shape[1]))
                self.barrier(out, "model input")
        elif node.op == "call_module":
            out = self.call_module(node)
        elif node.op in ("call_function", "call_method"):
            out = self.call_function(node)
        elif node.op == "output":
            for arg in node.all_input_nodes:
                self.barrier(self.space(arg), "reaches the model output")
        if out is not None:
            self.space_of[node] = out

    def call_module(self, node: fx.Node) -> int | None:
        name = node.target
        m = self.modules[name]
        inp = node.args[0] if node.args else None
        s_in = self.space(inp)
        prefix = name + "."
        if isinstance(m, (nn.Conv1d, nn.Conv3d)):
            self.barrier(s_in, f"consumed by {type(m).__name__} {name} (only Conv2d is supported)")
            return None
        if isinstance(m, nn.Conv2d):
            # timm's ScaledStdConv2d & co. carry per-filter tensors (``gain``) next to weight / bias, and
            # standardise each filter over all its input channels (so those cannot be split)
            extras = [(n, t) for n, t in list(m.named_parameters(recurse=False)) +
                      list(m.named_buffers(recurse=False)) if n not in ("weight", "bias") and t is not None]
            standardised = "StdConv" in type(m).__name__
            if s_in is not None and m.groups > 1:
                # grouped / depthwise conv: maps each conv group to itself, channels stay together
                s = s_in
                self.spaces[s].grouped_convs[name] = m.groups
                self.add_dim(s, prefix + "weight", m.weight, 0, "grouped")
                if m.bias is not None:
                    self.add_dim(s, prefix + "bias", m.bias, 0, "grouped")
                self._conv_extras(s, name, m, extras, "grouped")
                self.spaces[self.find(s)].consumers.append(name)
                return s
            if s_in is not None:
                self.consume(s_in, name, m)
                if standardised:
                    self.barrier(s_in, f"read by the weight-standardised {type(m).__name__} {name} (each "
                                       "filter is normalised over all its input channels)")
            s = self.produce(name, m, m.out_channels)
            self._conv_extras(s, name, m, extras, "producer")
            if m.groups > 1:
                self.barrier(s, f"{name} is a grouped conv fed by channels that are not split")
            return s
        if isinstance(m, nn.Linear):
            in_shape = _shape(inp)
            if s_in is not None:
                if in_shape is None or len(in_shape) != 2:
                    self.barrier(s_in, f"consumed by Linear {name} on a {len(in_shape or ())}-d tensor")
                else:
                    self.consume(s_in, name, m)
            return self.produce(name, m, m.out_features)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if s_in is None:
                return None
            if not _norm_act_is_per_channel(m):
                self.barrier(s_in, f"{type(m).__name__} {name} carries an op that mixes channels")
                return None
            for attr in ("weight", "bias"):
                t = getattr(m, attr, None)
                if t is not None:
                    self.add_dim(s_in, prefix + attr, t, 0, "norm")
            for attr in ("running_mean", "running_var"):
                t = getattr(m, attr, None)
                if t is not None:
                    self.add_dim(s_in, prefix + attr, t, 0, "norm", buffer=True)
            return s_in
        if isinstance(m, nn.GroupNorm):
            if s_in is None:
                return None
            if not _norm_act_is_per_channel(m):
                self.barrier(s_in, f"{type(m).__name__} {name} carries an op that mixes channels")
                return None
            self.spaces[s_in].norm_groups[name] = m.num_groups
            for attr in ("weight", "bias"):  # timm's GroupNorm1 may keep affine=True with no bias
                if getattr(m, attr, None) is not None:
                    self.add_dim(s_in, prefix + attr, getattr(m, attr), 0, "norm")
            return s_in
        if isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._NormBase)):
            self.barrier(s_in, f"normalised across channels by {type(m).__name__} {name}")
            return None
        if _is_elementwise_module(m):
            return self._passthrough(node, s_in, type(m).__name__, reshape=isinstance(m, nn.Flatten))
        self.barrier(s_in, f"consumed by {type(m).__name__} {name}, which loft_ext does not know")
        return None

    @staticmethod
    def _reads_channel_count(node: fx.Node, shape) -> bool:
        """Does this ``x.shape`` / ``x.size(...)`` node hand dim 1 to the code?"""
        ndim = len(shape) if shape is not None else 4
        def is_channel(i):
            return isinstance(i, int) and i in (1, 1 - ndim)
        if node.op == "call_method" and (len(node.args) > 1 or "dim" in node.kwargs):
            return is_channel(node.args[1] if len(node.args) > 1 else node.kwargs["dim"])
        for user in node.users:
            if user.op == "call_function" and user.target is operator.getitem:
                idx = user.args[1]
                if isinstance(idx, int) and not is_channel(idx):
                    continue
                if isinstance(idx, slice) and 1 not in range(ndim)[idx]:
                    continue
            return True  # dim 1 taken, or the whole size passed on
        return False

    def _conv_extras(self, s: int, name: str, m: nn.Module, extras, role: str) -> None:
        """Extra per-filter tensors of a conv subclass follow its output rows; any other shape is a barrier."""
        for n, t in extras:
            if t.dim() >= 1 and t.shape[0] == m.out_channels:
                self.add_dim(s, f"{name}.{n}", t, 0, role)
            else:
                self.barrier(s, f"{type(m).__name__} {name} holds {n} of shape {tuple(t.shape)}, which loft_ext "
                                "does not know how to split")

    def _passthrough(self, node: fx.Node, s_in: int | None, what: str, reshape: bool = False,
                     inp: fx.Node | None = None) -> int | None:
        """An op applied per channel (``reshape``: one that may fold dims): check dim 1 survives whole."""
        if s_in is None:
            return None
        # ``inp``: the channel tensor (for ``scale * x`` it is not the first input)
        in_shape, out_shape = _shape(inp if inp is not None else node.all_input_nodes[0]), _shape(node)
        if out_shape is None:
            return None  # e.g. x.size(): metadata, not data
        if len(out_shape) < 2 or in_shape is None or len(in_shape) < 2 or out_shape[1] != in_shape[1]:
            self.barrier(s_in, f"reshaped by {what}")
            return None
        if reshape and math.prod(in_shape[2:]) != math.prod(out_shape[2:]):
            self.barrier(s_in, f"flattened with spatial positions by {what}")
            return None
        return s_in

    def call_function(self, node: fx.Node) -> int | None:
        target = node.target
        what = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        tensor_args = [a for a in node.all_input_nodes if _shape(a) is not None]
        channel_args = [a for a in tensor_args if self.space(a) is not None]
        if not channel_args:
            return None
        s_first = self.space(channel_args[0])
        is_method = node.op == "call_method"
        split = (target in _SPLIT_METHODS) if is_method else (target in _SPLIT_FUNCTIONS)
        if split or target is operator.getitem:
            return self._split(node, s_first, what, channel_args[0])
        if (not is_method and target is getattr and node.args[1:2] == ("shape",)) or \
                (is_method and target == "size"):
            if self._reads_channel_count(node, _shape(channel_args[0])):
                # e.g. ``B, C, H, W = x.shape`` then ``y.reshape(B, C, H, W)``: the count is a number now
                self.barrier(s_first, f"its channel count is read by x.{'shape' if target is getattr else 'size()'} "
                                      "and used as a number")
            return None
        if _shape(node) is None:
            if _piece_shapes(node):  # an op returning several tensors that loft_ext does not know
                for a in channel_args:
                    self.barrier(self.space(a), f"consumed by {what}, which loft_ext does not know")
            return None  # size/shape/dim queries and the like carry no channel data
        add = target in (_ADD_METHODS if is_method else _ADD_FUNCTIONS)
        mul = target in (_MUL_METHODS if is_method else _MUL_FUNCTIONS)
        div = target in (_DIV_METHODS if is_method else _DIV_FUNCTIONS)
        if add or mul or div:
            if len(channel_args) == 2:
                a, b = (self.space(x) for x in channel_args)
                if add:
                    self.barrier(a, f"joined by a residual {what}")
                    self.barrier(b, f"joined by a residual {what}")
                    return self.union(a, b)
                if mul and a != b:
                    return self.union(a, b, gate=True)  # squeeze-excite gate: its rows follow the channels
                if mul:
                    return a  # x * f(x), e.g. swish
                self.barrier(a, f"divided by another channel tensor ({what})")
                self.barrier(b, f"divided by another channel tensor ({what})")
                return self.union(a, b)
            # one channel tensor and a scalar / broadcast tensor: per channel unless it has C entries
            for other in tensor_args:
                if other in channel_args:
                    continue
                shp = _shape(other)
                # broadcasting aligns shapes on the right: which dim of ``other`` meets the channel dim?
                j = 1 - (len(_shape(node)) - len(shp))
                if 0 <= j < len(shp) and shp[j] != 1:
                    self.barrier(s_first, f"combined with a per-channel tensor by {what}")
                    return None
            return self._passthrough(node, s_first, what, inp=channel_args[0])
        if (target in _ELEMENTWISE_METHODS) if is_method else (target in _ELEMENTWISE_FUNCTIONS):
            return self._passthrough(node, s_first, what, inp=channel_args[0])
        if (target in _REDUCE_METHODS) if is_method else (target in (torch.mean, torch.sum, torch.amax)):
            return self._passthrough(node, s_first, what, inp=channel_args[0])
        if (target in _RESHAPE_OPS) if is_method else (target is torch.flatten):
            if is_method and target in ("view", "reshape"):
                sizes = node.args[1:]
                if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
                    sizes = sizes[0]
                if len(sizes) > 1 and isinstance(sizes[1], int) and sizes[1] != -1:
                    # x.reshape(B, self.dim, ...): a channel count fixed in the code cannot shrink
                    self.barrier(s_first, f"reshaped to a fixed channel count by {what}")
                    return None
            return self._passthrough(node, s_first, what, reshape=True, inp=channel_args[0])
        if not is_method and target in _CAT_FUNCTIONS:
            for a in channel_args:
                self.barrier(self.space(a), f"concatenated by {what}")
            return None
        for a in channel_args:
            self.barrier(self.space(a), f"consumed by {what}, which loft_ext does not know")
        return None


    def _split(self, node: fx.Node, s_in: int, what: str, inp: fx.Node) -> int | None:
        """split / chunk / tensor_split / narrow / unbind / slicing of a channel tensor.

        A piece along the channel dim has a size fixed in the model's code (``torch.split(x,
        self.splits, 1)`` in MixNet, ``x.split(self.expand_chs // 2)`` in CSPNet, ``spx[i]`` in
        Res2Net): a worker holding only some of the channels would cut its narrower tensor at the
        wrong places. So the channels that reach such a split stay shared (the op is named as the
        reason) and the pieces, being parts of a shared tensor, are shared too (no space). A split or
        index along another dim (batch, space) keeps the channels whole but is not followed either.
        """
        in_shape = _shape(inp)
        pieces = _piece_shapes(node) or ([_shape(node)] if _shape(node) is not None else [])
        if in_shape is None or not pieces:
            return None  # e.g. indexing x.shape
        if node.target is operator.getitem and all(len(p) == len(in_shape) and p == in_shape for p in pieces):
            return s_in  # x[:] / x[..., :] keeps everything
        along_channels = any(len(p) != len(in_shape) or p[1] != in_shape[1] for p in pieces)
        if along_channels:
            kind = "sliced" if node.target is operator.getitem or what == "narrow" else "split"
            self.barrier(s_in, f"{kind} along channels by {what} (fixed-size pieces cannot shrink "
                               "with a worker's share)")
        else:
            self.barrier(s_in, f"split along a non-channel dim by {what}, which loft_ext does not follow")
        return None


class NothingSplittable(PartitionError):
    """The analysis succeeded but every channel group has to stay shared (the message lists why)."""


def analyse_channels(model: nn.Module, input_shape: tuple[int, ...],
                     model_name: str | None = None) -> list[ChannelSpace]:
    """Trace ``model`` and return every channel space with its tensors and barriers."""
    gm = trace(model, input_shape)
    return _Analysis(model, gm, model_name).run()
