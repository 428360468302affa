"""The chain recorder: a chain of layers and maps, recorded through hooks (docs/maths.md §1.1, §6.1, §6.7).

``FPropagation(model)`` records a plain ``nn.Sequential`` of table entries this way (``graph=False`` asks for it on
any model); every other model goes to the tape (:mod:`torch_fadjoint.tape`). :class:`ChainRecorder` is the
attach-time plan (one pre-hook and one hook per module, each handle kept: zennit's ``Hook.register``/``remove``,
STYLE P4) and the per-forward record: for each parametric layer k (an entry of :mod:`torch_fadjoint.layers`) and
the parameter-free maps after it (:mod:`torch_fadjoint.maps`), a :class:`~torch_fadjoint.layers.LayerRecord`:

    x_prev  X^{k-1}   what the layer received        y  Y^k (kept when a rule or a map needs it)
    x       X^k       the next layer's input, or the model's output
    maps    one record per map: what its backward needs (a mask, X, the pool's input, a shape)

Functional forwards between modules (``F.relu(x)``, ``F.max_pool2d(x, 2)``, ``torch.flatten(x, 1)``,
``x.view(x.size(0), -1)``, ``F.dropout(x, p, training=self.training)``, ``F.log_softmax(x, dim=1)``) are
seen by a ``TorchFunctionMode`` active during ``net(x)`` (STYLE P10) and go through the same table as
the modules. Models whose containers are all ``nn.Sequential`` (whose forward only calls its children)
run without the mode, and the recorder runs them itself (``ChainRecorder._run``): each leaf's two hooks and
``forward`` called in the order and the way ``nn.Module.__call__`` would call them, without its dispatch, whenever
nothing else would run there (no other hook, no module compiled in place or with its own ``__call__``, torch's own
``nn.Sequential``; else ``model(x)``). Records are detached tensors that share storage with the forward's own.

Exact or refused (§6.7): the executed modules and functionals must form a chain — every layer and map
receives exactly what the one before it returned, and the model returns the last one's output.
Refused, naming the module or op: any other op on the chain (arithmetic, an in-place op, a skip
connection, ``torch.cat``, indexing); a module with no table entry, or holding parameters without a
parametric-layer entry; a forward hook or pre-hook registered on a module before wrapping
(hook-based ``weight_norm``/``spectral_norm``, a user's hook that changes an output); an in-place map that
overwrites the input its own derivative needs. Every record keeps the version counter it was taken at, and
the sweep refuses a record (or a parameter it reads) that was modified in place after the forward. Tied
parameters (one parameter in two layers, or a module run twice) accumulate both contributions, as autograd
does; frozen parameters get no feedback.

Over 400 lines: one class, the chain recorder's plan and record, whose hooks share the per-forward state.
"""
from __future__ import annotations

import operator
import os
import weakref

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .layers import Layer, LayerRecord, layer_for, supported_layers
from .maps import FUNCTIONALS, MAPS, TRANSPARENT, VIEWS, Map, MapRecord, Reshape, map_for, supported_maps
from .module_reads import gradient_hook, read_change, read_through, setting_change, settings_of

__all__ = ["ChainRecorder", "HookedRecorder", "plain_chain"]


_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)  # looked up once, not per call


def _compiling() -> bool:
    return _is_compiling is not None and bool(_is_compiling())


def _detach(tensor: Tensor) -> Tensor:
    """The tensor itself when it carries no graph (the usual no_grad case), else a detached view."""
    return tensor.detach() if tensor.requires_grad else tensor


def _ours(hook):
    """Mark a hook as a recorder's: other recorders on the same model ignore it (it does nothing unless its
    own recorder is recording)."""
    hook._fadjoint = True
    return hook


_STANDINS_KEPT = 64  # functional stand-ins cached per call signature, least recently used evicted first


def plain_chain(model: nn.Module) -> bool:
    """Whether ``model`` is provably a chain: every container is an ``nn.Sequential`` (whose forward calls its children
    in order and nothing else), every other module has a table entry (its exact type), and none has a forward hook or
    a forward replaced on the instance. Such a model is recorded as the chain of §6 (its
    special case, one use per value: ``net.layers``); any other on the tape."""
    return all((type(m) is nn.Sequential if next(m.children(), None) is not None
                else layer_for(m) is not None or map_for(m) is not None or type(m) in TRANSPARENT)
               and not _foreign_hooks(m) and "forward" not in m.__dict__ for m in model.modules())


_TORCH_DIR = os.path.realpath(os.path.dirname(torch.__file__)) + os.sep


def _torchs(function, module: str, qualname: str, file: str = ""):
    """``function`` when it is torch's own (its module, qualified name and source file, in torch's directory; not a
    wrapper), else None: a patch made before this module was imported is no reference for "unpatched"."""
    code = getattr(function, "__code__", None)
    if (getattr(function, "__module__", None) == module and getattr(function, "__qualname__", None) == qualname
            and not hasattr(function, "__wrapped__") and code is not None):
        path = os.path.realpath(code.co_filename)
        if path.startswith(_TORCH_DIR) and path.replace("\\", "/").endswith(file):
            return function
    return None


def _forward_holder(cls: type) -> tuple:
    """(the class in ``cls``'s MRO that holds ``forward``, that ``forward`` as it holds it: one object however its
    descriptor binds; a ``functools.partialmethod`` makes a new function at every ``cls.forward``), or (None, None)."""
    for base in cls.__mro__:
        if "forward" in base.__dict__:
            return base, base.__dict__["forward"]
    return None, None


def _own_forward(cls: type) -> bool:
    """Whether a class of torch's own (``torch.nn``) has its forward as torch defines it (a table entry says what
    that forward computes); any other class's forward is its author's (registered with it)."""
    if not cls.__module__.startswith("torch."):
        return True
    base, forward = _forward_holder(cls)
    return base is None or (base.__module__.startswith("torch.")
                            and _torchs(forward, base.__module__, f"{base.__qualname__}.forward") is not None)


# what nn.Sequential's forward calls, as torch defines it: the direct run (ChainRecorder._run) only stands in for these
_SEQUENTIAL_FORWARD = _torchs(nn.Sequential.forward, "torch.nn.modules.container", "Sequential.forward",
                              "torch/nn/modules/container.py")
_SEQUENTIAL_ITER = _torchs(nn.Sequential.__iter__, "torch.nn.modules.container", "Sequential.__iter__",
                           "torch/nn/modules/container.py")
_MODULE_CALL = _torchs(nn.Module.__call__, "torch.nn.modules.module", "Module._wrapped_call_impl",
                       "torch/nn/modules/module.py")
_MODULE_CALL_IMPL = _torchs(nn.Module._call_impl, "torch.nn.modules.module", "Module._call_impl",
                            "torch/nn/modules/module.py")
_DIRECT = None not in (_SEQUENTIAL_FORWARD, _SEQUENTIAL_ITER, _MODULE_CALL, _MODULE_CALL_IMPL)


def _direct_steps(model: nn.Module, hooks: dict) -> tuple | None:
    """``(steps, modules)`` for a model whose containers are all ``nn.Sequential``: each leaf in the order
    ``model(x)`` calls it, with this recorder's pre-hook and hook (``hooks``: id -> the hooks attach registered on
    it), and every module met; None when a module is missing (a ``None`` child) or is not a container or leaf with
    exactly the two hooks of a table entry."""
    steps, modules = [], []

    def walk(module) -> bool:
        modules.append(module)
        if module._modules:
            return type(module) is nn.Sequential and all(child is not None and walk(child)
                                                         for child in module._modules.values())
        registered = hooks.get(id(module), ())
        if len(registered) != 2 or len(module._forward_pre_hooks) != 1 or len(module._forward_hooks) != 1:
            return False
        steps.append((module, *registered))
        return True

    return (tuple(steps), tuple(modules)) if walk(model) else None


def _normalisations(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that keep running statistics (found once, at attach: the fingerprint says when
    the model changed)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]


def _check_inputs(inputs) -> None:
    """An input that requires grad is refused: autograd would fill its ``.grad``, the sweep does not."""
    for i, value in enumerate(inputs):
        if isinstance(value, Tensor) and value.requires_grad:
            raise ValueError(f"FPropagation: input {i} requires grad: autograd would fill its .grad, the F-adjoint "
                             "fills the parameters' only; pass it detached (x.detach())")


def _put_back(statistics: list[tuple[Tensor, Tensor]]) -> None:
    for buffer, value in statistics:
        buffer.copy_(value)


def _running_statistics(modules: list[nn.Module]) -> list[tuple[Tensor, Tensor]]:
    """(buffer, a copy) of every running statistic a train-mode normalisation layer among ``modules`` updates in its
    own forward (BatchNorm's running mean and variance, ``num_batches_tracked``): a refused forward puts them back."""
    kept = []
    for module in modules:
        if module.training and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked):
                if buffer is not None:
                    kept.append((buffer, buffer.clone()))
    return kept


def _foreign_hooks(module: nn.Module) -> list:
    return [h for hooks in (module._forward_pre_hooks, module._forward_hooks) for h in hooks.values()
            if not getattr(h, "_fadjoint", False)]


def _describe(name: str, module: nn.Module) -> str:
    return f"{name or '<model>'} ({type(module).__name__})"


class _Lazy:
    """Words made only when a message is: the recorder names every record, watch and setting it keeps, several per
    layer and forward, and reads a name only to refuse something (an f-string formats it then)."""

    __slots__ = ("make",)

    def __init__(self, make):
        self.make = make

    def __str__(self) -> str:
        return self.make()

    def __format__(self, spec: str) -> str:
        return format(self.make(), spec)


def _op_name(func) -> str:
    name = getattr(func, "__name__", repr(func))
    qualname = getattr(func, "__qualname__", name)
    if qualname.split(".")[0] in ("Tensor", "TensorBase", "_TensorBase"):
        return "Tensor." + name
    module = getattr(func, "__module__", "") or ""
    if module.startswith("torch.nn.functional"):
        return "F." + name
    return "torch." + name


class _ChainMode(TorchFunctionMode):
    """Sees every torch function called in the user's forward; the recorder decides (STYLE P10)."""

    def __init__(self, net: "ChainRecorder"):
        super().__init__()
        self.net = net

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        net = self.net
        if net._depth or not net._recording:
            return func(*args, **kwargs)
        for value in (*args, *kwargs.values()):  # a parameter read here is not a recorded layer's: never trained
            name = net._param_names.get(id(value)) if isinstance(value, nn.Parameter) else None
            if name is not None:
                raise ValueError(f"{_op_name(func)} reads the parameter {name} outside its module's recorded forward "
                                 "(F.linear(x, self.fc.weight), self.fc.forward(x), x @ self.fc.weight.T): its "
                                 "gradient would be missed; call the module itself (self.fc(x))")
        if net._last is None:
            return func(*args, **kwargs)
        return net._on_function(func, args, kwargs)


class HookedRecorder:
    """What both recorders share: the handles of the hooks they registered on the model (STYLE P4), removed at once."""

    _handles: list

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        raise NotImplementedError


class ChainRecorder(HookedRecorder):
    """The chain of §6 for ``net`` (an ``FPropagation``): its hooks on the model, and the records of the last
    forward (``layers``). Raises from :meth:`attach` (TypeError/ValueError naming the module) what it cannot record
    whatever it is given."""

    def __init__(self, net):
        self.net = net
        self._handles: list = []
        self._standins: dict = {}
        self._needs_mode = False
        self._steps = None  # (module, its pre-hook, its hook) per leaf in the order the forward calls them: _run
        self._recording = False
        self._undo: list = []  # what map entries' prepare() set on a module for one call (MaxPool's return_indices)
        self._param_names: dict[int, str] = {}
        self._normalisations: list[nn.Module] = []
        self._containers: list[tuple[str, nn.Module]] = []
        self.clear()

    @property
    def model(self) -> nn.Module:
        return self.net.model

    @property
    def keep_pre_activations(self) -> bool:
        return self.net.keep_pre_activations

    def attach(self) -> None:
        """Check every module first, then register the hooks (nothing is registered on error)."""
        plans = [(module, self._plan(name, module)) for name, module in self.model.named_modules()]
        hooks = {}
        for module, plan in plans:
            handles = plan()
            self._handles.extend(handles)
            hooks[id(module)] = [handle.hooks_dict_ref()[handle.id] for handle in handles]
        self._needs_mode = any(
            (next(m.children(), None) is not None and type(m) is not nn.Sequential) or isinstance(m, TRANSPARENT)
            for m in self.model.modules())
        self._steps = None if self._needs_mode or not _DIRECT else _direct_steps(self.model, hooks)
        self._param_names = {id(p): n for n, p in self.model.named_parameters(remove_duplicate=False)}
        self._normalisations = _normalisations(self.model)
        self._containers = [(name, m) for name, m in self.model.named_modules() if m._modules]  # their backward
        # hooks: the sweep refuses them (a leaf's are refused with its record)

    def clear(self) -> None:
        """Drop the records of the last forward."""
        self._layers: list[LayerRecord] = []
        self._output = None
        self._last = None
        self._last_version = 0
        self._last_from = ""
        self._calls: dict[int, int] = {}
        self._watch: list[tuple[Tensor, int, str, int | None]] = []  # (tensor, version, name, data_ptr of a
        # parameter: one given other memory after the forward, p.data = …, is refused as an in-place write is)
        self._configs: list[tuple] = []  # (module, its description, its settings then, the names the sweep reads
        # through it, what they gave then: module_reads.read_through)
        self._depth = 0
        self._transparent = None
        self._reads: list[tuple] = []  # (module, read_through of its parameters) of each layer whose forward
        # runs: what its pre-hook read, taken by its forward hook

    @property
    def layers(self) -> list[LayerRecord]:
        return self._layers

    def _plan(self, name: str, module: nn.Module):
        """Check ``module`` and return a function that registers its hooks (nothing is registered on error)."""
        foreign = _foreign_hooks(module)
        if foreign:
            hook = getattr(foreign[0], "__qualname__", type(foreign[0]).__name__)
            raise TypeError(f"{_describe(name, module)}: has a forward hook registered before wrapping ({hook}), which "
                            "may change what the module computes behind the recorder (hook-based weight_norm or "
                            "spectral_norm?); remove it, or register it after wrapping")
        if "forward" in module.__dict__:
            raise TypeError(f"{_describe(name, module)}: its forward is replaced on the instance, so it may not compute "
                            "what its type's table entry says; record the model on the tape (graph=None or True)")
        own = [n for n, p in module._parameters.items() if p is not None]
        layer, entry = layer_for(module), map_for(module)
        if (layer is not None or entry is not None or type(module) in TRANSPARENT or type(module) is nn.Sequential) \
                and not _own_forward(type(module)):
            raise TypeError(f"{_describe(name, module)}: its class's forward is not torch's own (patched?), so it may "
                            "not compute what its table entry says; record the model on the tape (graph=None or True)")
        if layer is not None:
            why = layer.check(module)
            if why:
                raise TypeError(f"{_describe(name, module)}: {why}")
            return lambda: [module.register_forward_pre_hook(self._layer_pre_hook(name, layer)),
                            module.register_forward_hook(self._layer_hook(name, layer))]
        if entry is not None and own:
            raise TypeError(f"{_describe(name, module)}: holds parameters {own} but is registered as a parameter-free "
                            "map, which cannot train them; use tfa.layers.register_layer()")
        if type(module) in TRANSPARENT:
            return lambda: [module.register_forward_pre_hook(self._transparent_pre_hook(name)),
                            module.register_forward_hook(self._transparent_hook(name))]
        if entry is not None:
            try:
                entry.check(module)
            except ValueError as exc:
                raise ValueError(f"{_describe(name, module)}: {exc}") from None
            return lambda: [module.register_forward_pre_hook(self._map_pre_hook(name, entry)),
                            module.register_forward_hook(self._map_hook(name, entry))]
        if next(module.children(), None) is not None and not own:
            return lambda: []  # a container: its leaves are hooked, its own forward runs under the mode
        if own:
            why = (f"holds parameters {own} and has no parametric-layer entry; register_layer() it or use one of: "
                   f"{', '.join(supported_layers())}")
        else:
            why = (f"is not supported; register_map() it or use one of: "
                   f"{', '.join(supported_layers() + supported_maps())}")
        return lambda: [module.register_forward_pre_hook(self._refusal(name, why))]

    def _watch_tensor(self, tensor, what: str, memory: bool = False) -> None:
        """Keep ``tensor``'s version (a weak reference: the sweep frees records as it goes). Inference tensors
        (a forward under ``torch.inference_mode``) carry no version counter and are not watched."""
        # is_inference() first, on purpose: under torch.compile it graph-breaks and the rest of the hook runs eagerly,
        # with eager versions; asking _compiling() first kept the hook traced and broke compiled_step (test_graph)
        if isinstance(tensor, Tensor) and not tensor.is_inference() and not _compiling():
            watch, version = self._watch, tensor._version
            if not memory and watch and watch[-1][0]() is tensor and watch[-1][1] == version:
                return  # watched last, at this version (a map's record that the next layer receives): once is enough
            watch.append((weakref.ref(tensor), version, what, tensor.data_ptr() if memory else None))

    def _consume(self, what: str, inputs: tuple) -> Tensor | None:
        """The chain tensor a module or op receives (None before the first layer); refuses a non-chain."""
        if len(inputs) != 1 or not isinstance(inputs[0], Tensor):
            raise ValueError(f"{what}: expected one tensor input, got {len(inputs)} inputs")
        x_in = inputs[0]
        if not self._layers:
            return x_in
        if x_in is not self._last:
            raise ValueError(f"{what} received a tensor that {self._last_from} did not return: an op or a skip "
                             "connection between layers is not a chain")
        if self._last_version is not None and x_in._version != self._last_version:
            raise ValueError(f"{what}: its input, the output of {self._last_from}, was modified in place before it")
        return x_in

    def _advance(self, output: Tensor, source: str) -> None:
        self._last, self._last_from = output, source
        # inference tensors carry no version counter; under torch.compile the versions of traced tensors
        # are not the eager ones (functionalised): the in-place checks are eager-mode checks
        self._last_version = None if output.is_inference() or _compiling() else output._version

    def _refusal(self, name: str, why: str):
        def refuse(module, inputs):
            if self._recording:
                self._depth += 1
                raise TypeError(f"{_describe(name, module)} {why}")
        return _ours(refuse)

    def _layer_pre_hook(self, name: str, layer: Layer):
        def check_input(module, inputs):
            if not self._recording:
                return None
            self._depth += 1  # the module's own ops are not the chain's (reset by forward() on error)
            what = _Lazy(lambda: _describe(name, module))
            known = self._param_names
            through = read_through(module, layer.param_names)  # the parameters its forward reads (on_layer adds
            for param_name, value in zip(layer.param_names, through[1::2]):  # the buffers, as they are after it)
                if value is not None and id(value) not in known:
                    raise ValueError(f"{what}: its {param_name} is not the parameter it was wrapped with (torch.func."
                                     "functional_call, or a tensor assigned in its place?): the sweep would update "
                                     "the wrapped one")
            x_prev = self._consume(what, inputs)
            why = layer.check_input(module, x_prev)
            if why:
                raise ValueError(f"{what}: {why}")
            self._reads.append((module, through))  # for its on_layer (a stack: a layer may hold layers)
            return None
        return _ours(check_input)

    def _layer_hook(self, name: str, layer: Layer):
        param_whats = [f"{name}.{param_name}" for param_name in layer.param_names]  # fixed per hook: made once

        def on_layer(module, inputs, output):
            if not self._recording:
                return None
            try:
                if not isinstance(output, Tensor):
                    raise ValueError(f"{_describe(name, module)}: expected a tensor output, got {type(output).__name__}")
                x_prev = _detach(inputs[0])
                calls, key = self._calls, id(module)
                call = calls[key] = calls.get(key, 0) + 1
                layers = self._layers
                rec = LayerRecord(len(layers) + 1, name, module, layer, x_prev, saved=layer.record(module, x_prev, output),
                                  call=call)
                described = _Lazy(lambda: rec.describe)
                if layers:
                    layers[-1].x = x_prev
                if self.keep_pre_activations:
                    rec.y = _detach(output)
                    self._watch_tensor(rec.y, _Lazy(lambda: f"Y^{rec.k}, the output of {rec.describe}"))
                self._watch_tensor(x_prev, _Lazy(lambda: f"X^{rec.k - 1}, the input of {rec.describe}"))
                read = self._reads.pop() if self._reads else None
                if read is None or read[0] is not module:  # its check_input always ran first: never, but say so
                    raise RuntimeError(f"{described}: its forward hook ran without its pre-hook (hooks reordered?)")
                through = read[1]
                for what, param in zip(param_whats, through[1::2]):
                    self._watch_tensor(param, what, memory=True)
                buffers = module._buffers  # running statistics are buffers: a Linear has none (no failing getattr)
                reads = layer.param_names
                if buffers:
                    reads = (*reads, *buffers)
                    through += read_through(module, tuple(buffers))[1:]
                if buffers and not (isinstance(rec.saved, dict) and rec.saved.get("train", True)):
                    for buffer_name in ("running_mean", "running_var"):  # eval-mode BatchNorm reads them
                        self._watch_tensor(buffers.get(buffer_name), f"{name}.{buffer_name}")
                self._configs.append((module, described, settings_of(module), reads, through))
                layers.append(rec)
                self._advance(output, described)
            finally:
                self._depth -= 1
            return None
        return _ours(on_layer)

    def _map_pre_hook(self, name: str, entry: Map):
        def check_input(module, inputs):
            if not self._recording:
                return None
            self._depth += 1
            self._consume(_Lazy(lambda: _describe(name, module)), inputs)
            try:
                undo = entry.prepare(module)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{_describe(name, module)}: {exc}") from None
            self._undo.append(undo)
            return None
        return _ours(check_input)

    def _map_hook(self, name: str, entry: Map):
        def on_map(module, inputs, output):
            if not self._recording:
                return None
            try:
                undo = self._undo.pop() if self._undo else None
                if undo is not None:
                    undo()
                return self._record_map(_Lazy(lambda: _describe(name, module)), name, module, entry, inputs[0],
                                        lambda: output, module_output=output)
            finally:
                self._depth -= 1
        return _ours(on_map)

    def _record_map(self, what: str, name: str, module: nn.Module, entry: Map, y: Tensor, call, module_output=None):
        """Run (or take) the map's output, record it into the current layer; returns a replaced output or None."""
        try:
            if module_output is not None:
                x, saved = entry.hook_output(module, y, module_output)
            else:
                x, saved = entry.run(module, y, call)
        except (TypeError, ValueError) as exc:  # a table entry refusing this use: name the module or op
            raise type(exc)(f"{what}: {exc}") from None
        if not self._layers:  # before the first layer: input preprocessing, nothing to record
            return None if x is module_output else x
        layer = self._layers[-1]
        if x is y and entry.saves == "input":
            raise ValueError(f"{what}: an in-place map overwrites its own input, which its derivative needs; "
                             "use inplace=False")
        if x is y and self.keep_pre_activations and layer.y is y:
            raise ValueError(f"{what}: an in-place map overwrites its input Y^{layer.k}, which keep_pre_activations "
                             "keeps (LFP reads it); use inplace=False")
        if isinstance(saved, Tensor):
            saved = _detach(saved)
            self._watch_tensor(saved, _Lazy(lambda: f"the record of {what}"))
        elif isinstance(saved, tuple):  # MaxPool's (Y, indices)
            saved = tuple(_detach(item) if isinstance(item, Tensor) else item for item in saved)
            for item in saved:
                self._watch_tensor(item, f"the record of {what}")
        rec = MapRecord(name, module, entry, saved)
        reads = tuple(module._buffers)
        self._configs.append((module, what, settings_of(module), reads, read_through(module, reads)))
        if self.keep_pre_activations:
            rec.y, rec.x = _detach(y), _detach(x)
            self._watch_tensor(rec.y, f"the input of {what}")
        if entry.saves == "input" and layer.y is None and not layer.maps:
            layer.y = saved[0] if isinstance(saved, tuple) else saved  # the same tensor: Y^k is kept once
        layer.maps.append(rec)
        self._advance(x, what)
        return None if x is module_output else x

    def _transparent_pre_hook(self, name: str):
        def enter(module, inputs):
            if self._recording:
                self._consume(_describe(name, module), inputs)
                self._transparent = (name, module)
        return _ours(enter)

    def _transparent_hook(self, name: str):
        def leave(module, inputs, output):
            if self._recording:
                self._transparent = None
                if self._layers and output is not self._last:
                    raise ValueError(f"{_describe(name, module)}: its output is not what its functional returned")
        return _ours(leave)

    def _on_function(self, func, args: tuple, kwargs: dict):
        """A torch function called on the chain tensor between modules: a map of the table, or refused."""
        last = self._last
        leaves, _ = tree_flatten((args, kwargs))
        if not any(leaf is last for leaf in leaves):
            return func(*args, **kwargs)  # not on the chain: a later use of its result is refused there
        op = _op_name(func)
        name = self._transparent[0] if self._transparent is not None else f"{op} after {self._last_from}"
        where = _describe(*self._transparent) if self._transparent is not None else name
        builder = FUNCTIONALS.get(func)
        others = [leaf for leaf in leaves if isinstance(leaf, Tensor) and leaf is not last]
        if (builder is None and func not in VIEWS) or others or args[0] is not last:
            result = func(*args, **kwargs)
            if not any(isinstance(leaf, Tensor) for leaf in tree_flatten(result)[0]):
                return result  # metadata: x.size(0), x.shape, x.dim()
            raise ValueError(f"{op} on the output of {self._last_from} is not a map of the chain (arithmetic, an "
                             f"in-place op, indexing, a skip connection or torch.cat are refused); supported: "
                             f"the modules and functionals of tfa.maps")
        if self._last_version is not None and last._version != self._last_version:
            raise ValueError(f"{where}: its input, the output of {self._last_from}, was modified in place before it")
        if func in VIEWS:
            if any(isinstance(arg, torch.dtype) for arg in (*args, *kwargs.values())):
                raise ValueError(f"{where}: a view to another dtype reinterprets the bits (not differentiable); "
                                 "expected a shape")
            x = func(*args, **kwargs)
            module = Reshape(x.shape[1:])
            self._record_map(where, name, module, MAPS[Reshape], last, lambda: x)
            return x
        module = self._transparent[1] if self._transparent is not None else self._standin(func, builder, args, kwargs)
        entry = map_for(module)
        try:
            entry.check(module)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        replaced = self._record_map(where, name, module, entry, last, lambda: func(*args, **kwargs))
        return self._last if replaced is None else replaced

    def _standin(self, func, builder, args, kwargs) -> nn.Module:
        """The module equivalent to a functional call (cached per call signature)."""
        try:
            key = (func, args[1:], tuple(sorted(kwargs.items())))
            hash(key)
        except TypeError:
            return builder(*args, **kwargs)
        module = self._standins.pop(key, None)
        if module is None:
            module = builder(*args, **kwargs)
            if len(self._standins) >= _STANDINS_KEPT:  # a scheduled argument (dropout's p) makes a new key each step
                del self._standins[next(iter(self._standins))]
        self._standins[key] = module  # most recently used last
        return module

    def forward(self, args: tuple, kwargs: dict):
        """Record one forward as a chain (the façade checked the model is what attach saw); returns its output."""
        if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
            raise RuntimeError("FPropagation: a global module forward hook is registered "
                               "(nn.modules.module.register_module_forward_hook); it may change outputs unseen")
        self.clear()
        _check_inputs(args if not kwargs and all(isinstance(a, Tensor) for a in args)
                      else tree_flatten((args, kwargs))[0])
        statistics = _running_statistics(self._normalisations)  # what a refused forward must put back
        self._recording = True
        try:
            # no autograd graph: nothing would use it (the sweep is ours); the output has requires_grad=False
            if self._needs_mode:
                with torch.no_grad(), _ChainMode(self):
                    output = self.model(*args, **kwargs)
            elif self._steps is not None and len(args) == 1 and not kwargs and self._runs_as_planned():
                with torch.no_grad():
                    output = self._run(args[0])
            else:
                with torch.no_grad():
                    output = self.model(*args, **kwargs)
            self._finish(output)
        except BaseException:
            self.clear()
            _put_back(statistics)
            raise
        finally:
            self._recording = False
            while self._undo:  # a forward that raised inside a module whose entry prepared it
                undo = self._undo.pop()
                if undo is not None:
                    undo()
        return output

    def _runs_as_planned(self) -> bool:
        """Whether ``model(x)`` would call each leaf of ``_steps`` in turn with this recorder's two hooks and nothing
        else: the façade found the model as attach saw it (hooks included, ``net._pristine``; ``net.model``
        replaced is refused there), no module is compiled in place (``module.compile()``), has a backward hook, a ``_call_impl`` set on
        it or a class whose ``__call__`` or ``_call_impl`` is not ``nn.Module``'s, ``nn.Sequential``'s ``forward``
        and ``__iter__`` are torch's, and no JIT trace is running."""
        modules = self._steps[1]
        return (self.net._pristine and nn.Sequential.forward is _SEQUENTIAL_FORWARD
                and nn.Sequential.__iter__ is _SEQUENTIAL_ITER and not torch._C._get_tracing_state()
                and not any(m._compiled_call_impl is not None or m._backward_hooks or m._backward_pre_hooks
                            or "_call_impl" in m.__dict__ or type(m).__call__ is not _MODULE_CALL
                            or type(m)._call_impl is not _MODULE_CALL_IMPL for m in modules))

    def _run(self, x):
        """``model(x)`` for a model of nested ``nn.Sequential`` containers, its leaves' hooks called here as
        ``nn.Module.__call__`` calls them (a hook's non-None return replaces the input or the output) and each
        leaf's ``forward`` directly: the same calls in the same order, without ``__call__``'s dispatch (a fifth of
        the recording's cost on a small MLP; docs/performance.md)."""
        for module, pre, post in self._steps[0]:
            inputs = (x,)
            replaced = pre(module, inputs)
            if replaced is not None:
                inputs = replaced if isinstance(replaced, tuple) else (replaced,)
            x = module.forward(*inputs)
            replaced = post(module, inputs, x)
            if replaced is not None:
                x = replaced
        return x

    def _refuse_hook(self, hook: str):
        """RuntimeError naming a backward-side hook the sweep would have to call (records cleared)."""
        self.clear()
        raise RuntimeError(f"FPropagation: {hook}, which autograd would call and the F-adjoint does not; records "
                           "cleared, nothing was changed (remove it; clip or freeze in the optimizer instead)")

    def _finish(self, output) -> None:
        if not self._layers:
            raise ValueError(f"FPropagation: no parametric layer ran in the forward; nothing to record "
                             f"(layers: {', '.join(supported_layers())})")
        if output is not self._last:
            raise ValueError(f"FPropagation: the model's output is not what {self._last_from} returned (an op after "
                             "it that is not a map of the table?)")
        if self._last_version is not None and output._version != self._last_version:
            raise ValueError(f"FPropagation: the model's output, from {self._last_from}, was modified in place")
        self._output = self._layers[-1].x = _detach(output)
        self._watch_tensor(self._output, "the model's output X^L")

    def recorded_layers(self) -> list[LayerRecord]:
        """The layers of the last forward after checking that no record went stale; RuntimeError otherwise."""
        for ref, version, what, pointer in self._watch:
            tensor = ref()
            if tensor is not None and tensor._version != version:
                self.clear()
                raise RuntimeError(f"FPropagation: {what} was modified in place after the forward recorded it; "
                                   "records cleared, nothing was changed (run the forward again)")
            if tensor is not None and pointer is not None and tensor.data_ptr() != pointer:
                self.clear()
                raise RuntimeError(f"FPropagation: the parameter {what} was given other memory after the forward "
                                   "(p.data = …, vector_to_parameters): the sweep would read the old one; records "
                                   "cleared, nothing was changed (run the forward again)")
        if _module_globals._global_backward_hooks or _module_globals._global_backward_pre_hooks:
            self._refuse_hook("a global module backward hook is registered (register_module_full_backward_hook)")
        for name, container in self._containers:  # autograd calls a container's hooks with its gradients too
            if container._backward_hooks or container._backward_pre_hooks:
                self._refuse_hook(f"{_describe(name, container)} has a backward hook (register_full_backward_hook / "
                                  "register_full_backward_pre_hook)")
        for module, what, then, names, through in self._configs:
            if module._backward_hooks or module._backward_pre_hooks:
                self._refuse_hook(f"{what} has a backward hook (register_full_backward_hook / register_backward_hook)")
            now = settings_of(module)
            if now != then:
                change = setting_change(module, then, now)
            else:  # the same objects (the usual case): nothing to say; else the differences in words, if any
                found = read_through(module, names)
                for name, tensor in zip(names, found[1::2]):  # what the sweep reads: parameters, buffers
                    if gradient_hook(tensor):
                        self._refuse_hook(f"{self._param_names.get(id(tensor), f'{what}: its {name}')} has a gradient "
                                          "hook (register_hook / register_post_accumulate_grad_hook)")
                change = (None if len(found) == len(through) and all(map(operator.is_, found, through))
                          else read_change(module, names, through, found))
            if change is not None:
                self.clear()
                raise RuntimeError(f"FPropagation: {what} was changed between the forward and the sweep ({change}); "
                                   "the sweep would use what the forward did not; records cleared, nothing was "
                                   "changed (run the forward again)")
        return self._layers

