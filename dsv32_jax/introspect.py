"""What a traced function allocates, read from its jaxpr (no compilation, no device memory).

`temporaries(fn, *args, weight_args=...)` traces `fn` on (abstract or concrete) arguments and lists
every array the function body creates, with its bytes, walking into the bodies of pjit, scan,
while, cond (e.g. `lax.platform_dependent`), remat, custom_jvp/vjp and shard_map. Inside a
shard_map body the shapes are per device; outside they are global (`per_device` says which).

Counted: each equation's outputs, except
  - views: reshape / squeeze / expand_dims / stop_gradient / same-width bitcast_convert_type
    (XLA lowers these to bitcasts; XLA:CPU is the exception for float8 bitcasts, see
    fp8_matmul), and
  - in-place updates (dynamic_update_slice, scatter*): they write into their first operand,
    which is counted where it was created (or is an argument),
  - the outputs of higher-order primitives, which are counted inside their bodies; only the
    stacked per-iteration outputs of a scan are counted at the scan.

Weight-derived temporaries: `weight_args` names the positional arguments that hold weights
(e.g. the nnx state); every matrix (ndim >= 2) there is a weight (vectors such as norm scales
and biases count as constants), grouped by its path with a trailing
`_scale` folded into the weight it scales (an FP8 kernel and its block scales are one group).
A value is weight-derived when it depends on some weight and on nothing else but constants
(literals, iota, ...): the dequantised copy of a weight is, its product with an activation is
not. Its `weight_bytes` is the size of the largest weight (group member) it derives from, per
device inside shard_map (scaled by that operand's shard fraction). Stacked decoder layers
(paths under `stacks`, leading layer axis [n, ...]) count per layer: the rank and the bytes of
one layer's slice, which is what the scanned layer body multiplies.

`collectives(text)` lists the collectives of a lowered program (StableHLO text, e.g. lowered
for ("tpu",) from abstract arrays) with the bytes each moves per device.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
from jax.extend import core as jcore

VIEWS = frozenset({"reshape", "squeeze", "expand_dims", "stop_gradient"})
IN_PLACE = frozenset({"dynamic_update_slice", "scatter", "scatter-add", "scatter_add", "scatter-mul",
                      "scatter_mul", "scatter-min", "scatter_min", "scatter-max", "scatter_max"})
CONST_SOURCES = frozenset({"iota"})


@dataclasses.dataclass(frozen=True)
class Temp:
    """One array created by the traced function."""
    nbytes: int
    shape: tuple
    dtype: str
    primitive: str
    where: str            # the name stack (jax.named_scope / module path) of the equation
    per_device: bool      # created inside a shard_map body (local shape)
    weight_bytes: int     # bytes of the largest weight it derives from; 0 if not weight-derived
    weight: str = ""      # that weight's group (argument path)

    @property
    def weight_ratio(self) -> float:
        return self.nbytes / self.weight_bytes if self.weight_bytes else 0.0


def _nbytes(aval) -> int:
    shape = getattr(aval, "shape", None)
    if shape is None:
        return 0
    return int(math.prod(shape)) * np.dtype(aval.dtype).itemsize


def _is_view(eqn) -> bool:
    name = eqn.primitive.name
    if name in VIEWS:
        return True
    if name == "bitcast_convert_type":
        return _nbytes(eqn.invars[0].aval) == _nbytes(eqn.outvars[0].aval)
    return False


def _closed(j):
    """(open jaxpr, consts) of a Jaxpr or ClosedJaxpr."""
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, j.consts
    return j, ()


def _sub_jaxprs(eqn):
    out = []
    for v in eqn.params.values():
        if isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr)):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out.extend(x for x in v if isinstance(x, (jcore.Jaxpr, jcore.ClosedJaxpr)))
    return out


# A value's state: None = activation (depends on a non-weight input), "const" = constant,
# or a dict {group: bytes} = weight-derived.
def _join(states):
    weights = {}
    for s in states:
        if s is None:
            return None
        if s != "const":
            for g, b in s.items():
                weights[g] = max(weights.get(g, 0), b)
    return weights or "const"


class _Walker:
    def __init__(self):
        self.temps: list[Temp] = []
        self.scope = ""        # name stack of the enclosing equations (bodies' stacks are relative)

    def state_of(self, env, v):
        if isinstance(v, jcore.Literal):
            return "const"
        return env.get(v, None)

    def record(self, var, eqn, state, per_device):
        aval = var.aval
        if not hasattr(aval, "shape"):
            return
        wb, wg = max(((b, g) for g, b in state.items()), default=(0, "")) if isinstance(state, dict) else (0, "")
        self.temps.append(Temp(_nbytes(aval), tuple(aval.shape), str(aval.dtype), eqn.primitive.name,
                               self.scope, per_device, wb, wg))

    def walk(self, jaxpr, consts_states, in_states, per_device):
        """Walk an open jaxpr; returns the states of its outvars."""
        env = {}
        for v, s in zip(jaxpr.constvars, consts_states):
            env[v] = s
        for v, s in zip(jaxpr.invars, in_states):
            env[v] = s
        for eqn in jaxpr.eqns:
            ins = [self.state_of(env, v) for v in eqn.invars]
            outer = self.scope
            local = str(eqn.source_info.name_stack)
            self.scope = "/".join(p for p in (outer, local) if p)
            outs = self.eqn(eqn, ins, per_device)
            self.scope = outer
            for v, s in zip(eqn.outvars, outs):
                env[v] = s
        return [self.state_of(env, v) for v in jaxpr.outvars]

    def call(self, j, ins, per_device):
        jaxpr, consts = _closed(j)
        return self.walk(jaxpr, ["const"] * len(consts), ins, per_device)

    def eqn(self, eqn, ins, per_device):
        name = eqn.primitive.name
        n_out = len(eqn.outvars)
        if name == "scan":
            return self.scan(eqn, ins, per_device)
        if name == "while":
            p = eqn.params
            nc, nb = p["cond_nconsts"], p["body_nconsts"]
            carry = ins[nc + nb:]
            jb, cb = _closed(p["body_jaxpr"])
            for _ in range(3):                      # fixed point of the carry states
                out = _Walker().walk(jb, ["const"] * len(cb), ins[nc:nc + nb] + carry, per_device)
                new = [_join([a, b]) for a, b in zip(carry, out)]
                if new == carry:
                    break
                carry = new
            self.call(p["cond_jaxpr"], ins[:nc] + carry, per_device)
            return self.call(p["body_jaxpr"], ins[nc:nc + nb] + carry, per_device)
        if name == "cond":
            outs = [self.call(b, ins[1:], per_device) for b in eqn.params["branches"]]
            return [_join(list(s)) for s in zip(*outs)]
        subs = _sub_jaxprs(eqn)
        if name == "shard_map" and subs:
            local = []
            for v, s, bv in zip(eqn.invars, ins, _closed(subs[0])[0].invars):
                if isinstance(s, dict):
                    frac = _nbytes(bv.aval) / max(_nbytes(v.aval), 1)
                    s = {g: int(b * frac) for g, b in s.items()}
                local.append(s)
            return self.call(subs[0], local, True)
        if subs:
            j = subs[0]
            jaxpr, _ = _closed(j)
            if len(subs) == 1 and len(jaxpr.invars) == len(ins) and len(jaxpr.outvars) == n_out:
                return self.call(j, ins, per_device)
            for j in subs:                          # unknown structure: walk for the listing only
                jx, cs = _closed(j)
                self.walk(jx, ["const"] * len(cs), [None] * len(jx.invars), per_device)
            return [None] * n_out
        if name in CONST_SOURCES or not eqn.invars:
            state = "const"
        else:
            state = _join(ins)
        if not (_is_view(eqn) or name in IN_PLACE):
            for v in eqn.outvars:
                self.record(v, eqn, state, per_device)
        return [state] * n_out

    def scan(self, eqn, ins, per_device):
        p = eqn.params
        nc, ncarry = p["num_consts"], p["num_carry"]
        jaxpr, cs = _closed(p["jaxpr"])
        consts, carry, xs = ins[:nc], ins[nc:nc + ncarry], ins[nc + ncarry:]
        for _ in range(3):
            out = _Walker().walk(jaxpr, ["const"] * len(cs), consts + carry + xs, per_device)
            new = [_join([a, b]) for a, b in zip(carry, out[:ncarry])]
            if new == carry:
                break
            carry = new
        out = self.walk(jaxpr, ["const"] * len(cs), consts + carry + xs, per_device)
        for v, s in zip(eqn.outvars[ncarry:], out[ncarry:]):   # the stacked ys are made by the scan
            self.record(v, eqn, s, per_device)
        return out


def _group(path) -> str:
    name = jax.tree_util.keystr(path)
    if name.endswith(".value"):
        name = name[: -len(".value")]
    if name.endswith("_scale']"):
        name = name[: -len("_scale']")] + "']"
    return name


def temporaries(fn, *args, weight_args: tuple[int, ...] = ()) -> list[Temp]:
    """Every array `fn(*args)` creates (see the module docstring), largest first.

    weight_args: indices of the positional arguments whose array leaves (ndim >= 2) are weights.
    """
    closed = jax.make_jaxpr(fn)(*args)
    leaves = [(i, path, leaf) for i, a in enumerate(args) for path, leaf in jax.tree_util.tree_flatten_with_path(a)[0]]

    def stacked(path):          # stacked decoder layers (dsv32_jax.model.BlockStack): [n, ...] per leaf
        return "['stacks']" in jax.tree_util.keystr(path)

    def is_weight(i, path, leaf):
        return i in weight_args and len(getattr(leaf, "shape", ())) - stacked(path) >= 2

    group_bytes: dict[str, int] = {}
    for i, path, leaf in leaves:
        if is_weight(i, path, leaf):
            g = _group(path)
            nbytes = _nbytes(leaf) // (leaf.shape[0] if stacked(path) else 1)     # one layer's weight
            group_bytes[g] = max(group_bytes.get(g, 0), nbytes)
    states = [{_group(path): group_bytes[_group(path)]} if is_weight(i, path, leaf) else
              ("const" if i in weight_args else None) for i, path, leaf in leaves]
    if len(states) != len(closed.jaxpr.invars):
        raise ValueError(f"temporaries: {len(states)} argument leaves but the jaxpr has "
                         f"{len(closed.jaxpr.invars)} inputs")
    w = _Walker()
    w.walk(closed.jaxpr, ["const"] * len(closed.consts), states, False)
    return sorted(w.temps, key=lambda t: -t.nbytes)


def largest_weight_temp(temps: list[Temp]) -> Temp | None:
    """The weight-derived temporary with the largest bytes / weight bytes (None if there is none)."""
    derived = [t for t in temps if t.weight_bytes]
    return max(derived, key=lambda t: t.weight_ratio) if derived else None


def largest_weight(tree) -> int:
    """Bytes of the largest array leaf of a pytree (e.g. the per-device shard when `tree` holds
    local shapes; the global array otherwise)."""
    return max((_nbytes(x) for x in jax.tree.leaves(tree) if hasattr(x, "shape")), default=0)


# ------------------------------------------------------------------ collectives in lowered programs
_COLLECTIVE = re.compile(r'"?stablehlo\.(all_to_all|all_gather|all_reduce|reduce_scatter|collective_permute)"?'
                         r'|@(ragged_all_to_all)\b')
_TENSOR = re.compile(r"tensor<([^>]*)>")
_FUNC = re.compile(r"func\.func\s+(?:public\s+|private\s+)?@([\w.$-]+)")
_CALL = re.compile(r"(?:func\.call|call)\s+@([\w.$-]+)")
_DTYPE_BYTES = {"i1": 1, "i8": 1, "ui8": 1, "i16": 2, "ui16": 2, "i32": 4, "ui32": 4, "i64": 8, "ui64": 8,
                "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "f8E4M3FN": 1, "f8E5M2": 1}


def _tensor_bytes(spec: str) -> int:
    parts = spec.split("x")
    dims, dt = parts[:-1], parts[-1]
    return math.prod(int(d) for d in dims) * _DTYPE_BYTES.get(dt, 4) if all(d.isdigit() for d in dims) else 0


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a lowered program, with the bytes it moves per device (see `collectives`)."""
    op: str
    operand_bytes: int
    output_bytes: int
    calls: int            # how many times it runs per call of the program (call-graph multiplicity)

    @property
    def wire_bytes(self) -> int:
        """all_to_all: its buffer. ragged_all_to_all: min(operand, output): a device sends at most its
        operand's rows and receives at most its output's rows, and the expert exchange sizes one of
        the two exactly (dispatch: the assignments sent; combine: the results received). Others: the
        larger of operand and output."""
        if self.op == "ragged_all_to_all":
            return min(self.operand_bytes, self.output_bytes)
        if self.op == "all_to_all":
            return self.operand_bytes
        return max(self.operand_bytes, self.output_bytes)


def collectives(stablehlo: str) -> list[Collective]:
    """The collectives of a lowered (StableHLO text) program, per device inside shard_map bodies,
    each with the number of times it runs per program call (functions called from several places,
    e.g. one shard_map body per layer, count once per call site; inside a counted loop such as the
    scan over decoder layers, once per iteration)."""
    funcs: dict[str, str] = {}
    starts = [(m.start(), m.group(1)) for m in _FUNC.finditer(stablehlo)]
    for (pos, name), nxt in zip(starts, starts[1:] + [(len(stablehlo), None)]):
        funcs[name] = stablehlo[pos:nxt[0]]
    if not funcs:
        funcs = {"main": stablehlo}
    main = "main" if "main" in funcs else next(iter(funcs))
    mult: dict[str, int] = {}

    def visit(name, times):
        mult[name] = mult.get(name, 0) + times
        body = funcs.get(name, "")
        loops = _counted_loops(body)
        for m in _CALL.finditer(body):
            callee = m.group(1)
            if callee in funcs and callee != name:
                visit(callee, times * _trips(loops, m.start()))

    visit(main, 1)
    out = []
    for name, body in funcs.items():
        if not mult.get(name):
            continue
        loops = _counted_loops(body)
        for m in _COLLECTIVE.finditer(body):
            op = m.group(1) or m.group(2)
            sig = body.find(" : (", m.end())
            arrow = body.find(") -> ", sig)
            if sig < 0 or arrow < 0:
                continue
            end = body.find("\n", arrow)
            ins = [_tensor_bytes(t) for t in _TENSOR.findall(body[sig:arrow])]
            outs = [_tensor_bytes(t) for t in _TENSOR.findall(body[arrow:end])]
            if op == "ragged_all_to_all":           # (operand, output, offsets/sizes ...) -> output
                ins, outs = ins[:1], outs[:1]
            out.append(Collective(op, sum(ins), sum(outs), mult[name] * _trips(loops, m.start())))
    return out


_WHILE_COND = re.compile(r"stablehlo\.while\b[^\n]*\n\s*cond\s*\{")
_TRIP = re.compile(r"stablehlo\.constant dense<(\d+)> : tensor<i\d+>\s*\n\s*%\S+ = stablehlo\.compare\s+LT,")


def _region_end(text: str, open_brace: int) -> int:
    """Index just past the brace that closes the one at `open_brace`."""
    depth = 0
    for i in range(open_brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _counted_loops(body: str) -> list[tuple[int, int, int]]:
    """(start, end, trips) of the `do` regions of the while loops of a function's text whose
    condition is `counter < constant` (lax.scan, e.g. the scanned decoder layers); loops with
    another condition (lax.while_loop) are left out (they count once)."""
    out = []
    for m in _WHILE_COND.finditer(body):
        cond_end = _region_end(body, m.end() - 1)
        trip = _TRIP.search(body, m.end(), cond_end)
        do = body.find("{", cond_end)
        if trip is None or do < 0 or not body[cond_end:do].strip() == "do":
            continue
        out.append((do, _region_end(body, do), int(trip.group(1))))
    return out


def _trips(loops, pos: int) -> int:
    """How many times text at `pos` runs per call of its function (nested counted loops multiply)."""
    n = 1
    for start, end, trips in loops:
        if start <= pos < end:
            n *= trips
    return n


# ------------------------------------------------------------------ collectives in compiled programs
# op names of the collectives in compiled HLO text
HLO_COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-reduce", "all-gather", "reduce-scatter",
                   "collective-permute")
_HLO_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
                    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_HLO_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16|f8e4m3fn|f8e5m2)\[([\d,]*)\]")


def compiled_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{op: {"count", "bytes"}} of the collectives in compiled (partitioned) HLO text: bytes of
    each op's result per device; async pairs are counted once, at their start; an op inside a
    loop body is counted once (as XLA's cost analysis does)."""
    out: dict[str, dict[str, int]] = {}
    for line in hlo_text.splitlines():
        m = re.search(r"=\s*(.+?)\s+([a-z\-]+)\(", line)
        if not m:
            continue
        op = m.group(2)
        base = op[: -len("-start")] if op.endswith("-start") else op
        if base not in HLO_COLLECTIVES or op.endswith("-done"):
            continue
        nbytes = 0
        for dt, dims in _HLO_SHAPE.findall(m.group(1)):
            n = 1
            for x in filter(None, dims.split(",")):
                n *= int(x)
            nbytes += n * _HLO_DTYPE_BYTES.get(dt, 4)
        if op.endswith("-start") and m.group(1).startswith("("):
            nbytes //= 2                      # (operand, result) tuple of an async start
        rec = out.setdefault(base, {"count": 0, "bytes": 0})
        rec["count"] += 1
        rec["bytes"] += nbytes
    return out
