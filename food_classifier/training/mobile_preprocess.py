"""The server's preprocessing as ONNX nodes: uint8 RGB [H, W, 3] of any size -> the model's float input.

    b = preprocess_nodes(spec, "rgb", "image")   # b.nodes, b.inits; the model's own nodes then read "image"

Why in the graph: a phone that decodes the photo and hands over its RGB bytes then gets the server's
pixels, not an approximation in app code (the documented bilinear recipe moved probabilities by up
to 0.096). It reproduces `preprocessing.resize_crop` + `normalize`, i.e. Pillow's `resize(box=...)`:
for output pixel i on an axis, the source window is `box0 + (i + 0.5) * s` ± `support * max(s, 1)`,
with s = side / crop the fractional crop box's scale, weights of the bicubic (a = -0.5) or bilinear
filter renormalized inside the image, and uint8 rounding after the horizontal and again after the
vertical pass (the vertical one first when the height shrinks by more than twice the width does: what
Pillow 13 does, found by experiment and pinned by tests/test_mobile.py). Two routes, picked at run time by an `If`:

* up to a 3x reduction (every photo an app decodes at the server's JPEG scale, docs/MOBILE.md): the
  two passes as float64 matrix products with Pillow's weights computed in the graph, which is
  Pillow's integer arithmetic exactly, so the model sees the server's pixels bit for bit (an int8
  stage 1 moved by 0.09 in probability when a few pixels moved by one grey level);
* beyond (a photo decoded at full size): ONNX Resize (opset 18) with `antialias=1`, which ONNX
  Runtime implements as Pillow's resampler with its weights in float32 (one or two grey levels off
  on ~0.05 % of the values), cheap at any size. Its `tf_crop_and_resize` ROI carries the fractional
  box; the image is first sliced to the box plus the filter's reach, so float32 coordinates stay exact.

Geometry is computed in float64 like Pillow's C code. Only plain ONNX operators: any ONNX Runtime
Mobile package runs it, and `required_operators.config` lists them for a reduced build.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from food_classifier.preprocessing import PreprocessSpec

SUPPORT = {"bicubic": 2.0, "bilinear": 1.0}  # Pillow's filter support (radius at scale 1)
CUBIC_A = -0.5  # Pillow's bicubic
MATRIX_ROUTE_MAX_SCALE = 3.0  # reductions up to this: the exact matrix route; beyond: ONNX Resize
NUDGE = 1 + 2.0 ** -20  # scales handed to Resize, so its output is never one pixel short of the crop


class Builder:
    """Unique names, constants and nodes for one graph (a subgraph gets its own Builder)."""

    def __init__(self, prefix: str):
        self.prefix, self.n = prefix, 0
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}{hint}_{self.n}"

    def const(self, value, dtype=None, hint: str = "c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, outputs: int = 1, hint: str | None = None, **attrs) -> str | list[str]:
        outs = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name(op_type), **attrs))
        return outs[0] if outputs == 1 else outs

    def graph(self, name: str, outputs: list[onnx.ValueInfoProto]) -> onnx.GraphProto:
        return helper.make_graph(self.nodes, name, [], outputs, self.inits)


def _geometry(b: Builder, rgb: str, spec: PreprocessSpec) -> dict[str, str]:
    """`resize_crop`'s arithmetic per axis, as float64 [2] tensors in (H, W) order: the box start `b0`
    and scale `s` as Pillow sees them (its box is float32), and the slice [lo, hi) of source pixels
    the filter reaches. Also the two booleans that pick a route."""
    d, f32 = TensorProto.DOUBLE, TensorProto.FLOAT
    hw = b.op("Slice", b.op("Shape", rgb), b.const([0], np.int64), b.const([2], np.int64), hint="hw")
    hw_d = b.op("Cast", hw, to=d)
    # side = spec.crop * min(w, h) / spec.resize; box = (left, left + side) with left = (w - side) / 2
    side = b.op("Div", b.op("Mul", b.op("ReduceMin", hw_d, keepdims=1), b.const([float(spec.crop)])),
                b.const([float(spec.resize)]))
    box0 = b.op("Div", b.op("Sub", hw_d, side), b.const([2.0]))
    box0_f, box1_f = b.op("Cast", box0, to=f32), b.op("Cast", b.op("Add", box0, side), to=f32)
    b0, b1 = b.op("Cast", box0_f, to=d, hint="b0"), b.op("Cast", box1_f, to=d)
    # Pillow: scale = (double)(in1 - in0) / out, the difference taken in float32
    s = b.op("Div", b.op("Cast", b.op("Sub", box1_f, box0_f), to=d), b.const([float(spec.crop)]), hint="s")
    reach = b.op("Mul", b.const([SUPPORT[spec.interpolation]]), b.op("Max", s, b.const([1.0])))
    lo = b.op("Max", b.op("Sub", b.op("Floor", b.op("Sub", b0, reach)), b.const([1.0])), b.const([0.0, 0.0]))
    hi = b.op("Min", b.op("Add", b.op("Ceil", b.op("Add", b1, reach)), b.const([1.0])), hw_d)
    # Pillow runs the vertical pass first when the height shrinks by more than twice the width does
    shrink = b.op("Sub", hw_d, b.const([float(spec.crop)] * 2))
    dy = b.op("Gather", shrink, b.const(0, np.int64), axis=0)
    dx = b.op("Gather", shrink, b.const(1, np.int64), axis=0)
    vfirst = b.op("And", b.op("Greater", dy, b.const(0.0)), b.op("Greater", dy, b.op("Mul", dx, b.const(2.0))))
    small = b.op("Cast", b.op("ReduceMax", b.op("Cast", b.op("LessOrEqual", s, b.const([MATRIX_ROUTE_MAX_SCALE])),
                                                to=TensorProto.INT32), keepdims=0), to=TensorProto.BOOL)
    return {"hw": hw_d, "b0": b0, "s": s, "lo": lo, "length": b.op("Sub", hi, lo, hint="length"),
            "start": b.op("Cast", lo, to=TensorProto.INT64), "end": b.op("Cast", hi, to=TensorProto.INT64),
            "vfirst": vfirst, "small": small}


def _swap(b: Builder, pair: str, vfirst: bool) -> str:
    return b.op("Gather", pair, b.const([1, 0], np.int64), axis=0) if vfirst else pair


def _resize_route(b: Builder, window: str, g: dict[str, str], spec: PreprocessSpec, vfirst: bool) -> str:
    """ONNX Resize with antialias: [1, 3, Lh, Lw] uint8 -> [1, 3, crop, crop] uint8. ONNX Runtime resamples
    the last axis first, so the vertical-first order runs on the transposed window."""
    f32, d = TensorProto.FLOAT, TensorProto.DOUBLE
    r = b.op("Cast", b.op("Div", b.const([NUDGE]), g["s"]), to=f32, hint="r")  # the scale Resize gets
    out_len = b.op("Cast", b.op("Floor", b.op("Mul", r, b.op("Cast", g["length"], to=f32))), to=d)  # as ORT does
    one = b.const([1.0])
    denom = b.op("Max", b.op("Sub", g["length"], one), one)
    # tf_crop_and_resize: x = roi0 * (L - 1) + i * (roi1 - roi0) * (L - 1) / (O - 1) must equal Pillow's
    # centre minus 0.5 in window coordinates: (b0 - lo) + (i + 0.5) * s - 0.5
    first = b.op("Sub", b.op("Add", b.op("Sub", g["b0"], g["lo"]), b.op("Mul", g["s"], b.const([0.5]))),
                 b.const([0.5]))
    roi0 = b.op("Div", first, denom)
    roi1 = b.op("Add", roi0, b.op("Div", b.op("Mul", g["s"], b.op("Sub", out_len, one)), denom))
    roi0, roi1, r = (_swap(b, t, vfirst) for t in (roi0, roi1, r))
    roi = b.op("Cast", b.op("Concat", b.const([0.0, 0.0]), roi0, b.const([1.0, 1.0]), roi1, axis=0), to=f32)
    scales = b.op("Concat", b.const([1.0, 1.0], np.float32), r, axis=0, hint="scales")
    x = b.op("Transpose", window, perm=[0, 1, 3, 2]) if vfirst else window
    mode = "cubic" if spec.interpolation == "bicubic" else "linear"
    resized = b.op("Resize", x, roi, scales, mode=mode, antialias=1, exclude_outside=1, cubic_coeff_a=CUBIC_A,
                   coordinate_transformation_mode="tf_crop_and_resize")
    crop = b.op("Slice", resized, b.const([0, 0], np.int64), b.const([spec.crop, spec.crop], np.int64),
                b.const([2, 3], np.int64))
    return b.op("Transpose", crop, perm=[0, 1, 3, 2]) if vfirst else crop


def _weights(b: Builder, g: dict[str, str], axis: int, spec: PreprocessSpec) -> str:
    """Pillow's filter weights for one axis (precompute_coeffs + normalize_coeffs_8bpc) as a float64
    [crop, window length] matrix of multiples of 2**-22."""
    d = TensorProto.DOUBLE
    pick = b.const([axis], np.int64)
    b0, s, lo, n, full = (b.op("Gather", g[k], pick, axis=0) for k in ("b0", "s", "lo", "length", "hw"))
    scale = b.op("Max", s, b.const([1.0]))
    support = b.op("Mul", b.const([SUPPORT[spec.interpolation]]), scale)
    i = b.op("Unsqueeze", b.const(np.arange(spec.crop, dtype=np.float64)), b.const([1], np.int64))  # [crop, 1]
    center = b.op("Add", b0, b.op("Mul", b.op("Add", i, b.const([0.5])), s))
    xmin = b.op("Max", b.op("Floor", b.op("Add", b.op("Sub", center, support), b.const([0.5]))), b.const([0.0]))
    xmax = b.op("Min", b.op("Floor", b.op("Add", b.op("Add", center, support), b.const([0.5]))), full)
    n_int = b.op("Cast", b.op("Squeeze", n), to=TensorProto.INT64)
    j = b.op("Add", b.op("Cast", b.op("Range", b.const(0, np.int64), n_int, b.const(1, np.int64)), to=d), lo)
    j = b.op("Unsqueeze", j, b.const([0], np.int64))  # [1, n]: source pixel index
    x = b.op("Abs", b.op("Div", b.op("Add", b.op("Sub", j, center), b.const([0.5])), scale))
    lt1 = b.op("Less", x, b.const([1.0]))
    if spec.interpolation == "bicubic":
        a = CUBIC_A
        near = b.op("Add", b.op("Mul", b.op("Sub", b.op("Mul", b.const([a + 2]), x), b.const([a + 3])),
                                b.op("Mul", x, x)), b.const([1.0]))
        far = b.op("Mul", b.op("Sub", b.op("Mul", b.op("Add", b.op("Mul", b.op("Sub", x, b.const([5.0])), x),
                                                             b.const([8.0])), x), b.const([4.0])), b.const([a]))
        w = b.op("Where", lt1, near, b.op("Where", b.op("Less", x, b.const([2.0])), far, b.const([0.0])))
    else:
        w = b.op("Where", lt1, b.op("Sub", b.const([1.0]), x), b.const([0.0]))
    w = b.op("Where", b.op("And", b.op("GreaterOrEqual", j, xmin), b.op("Less", j, xmax)), w, b.const([0.0]))
    total = b.op("ReduceSum", w, b.const([1], np.int64), keepdims=1)
    w = b.op("Div", w, b.op("Where", b.op("Equal", total, b.const([0.0])), b.const([1.0]), total))
    # (int)(0.5 + k * 2**22), or (int)(-0.5 + k * 2**22) below zero: rounding half away from zero
    fixed = b.op("Mul", w, b.const([float(1 << 22)]))
    fixed = b.op("Mul", b.op("Sign", fixed), b.op("Floor", b.op("Add", b.op("Abs", fixed), b.const([0.5]))))
    return b.op("Div", fixed, b.const([float(1 << 22)]), hint=f"w{axis}")


def _clip8(b: Builder, acc: str) -> str:
    """Pillow's end of a pass: (2**21 + sum) >> 22, clipped to 0..255 (exact in float64)."""
    return b.op("Clip", b.op("Floor", b.op("Add", acc, b.const(0.5))), b.const(0.0), b.const(255.0))


def _matrix_route(b: Builder, window: str, g: dict[str, str], spec: PreprocessSpec, vfirst: bool) -> str:
    """The two passes as matrix products: [1, 3, Lh, Lw] uint8 -> [1, 3, crop, crop] uint8."""
    wy, wx_t = _weights(b, g, 0, spec), b.op("Transpose", _weights(b, g, 1, spec), perm=[1, 0])
    x = b.op("Cast", b.op("Squeeze", window, b.const([0], np.int64)), to=TensorProto.DOUBLE)  # [3, Lh, Lw]
    if vfirst:
        out = _clip8(b, b.op("MatMul", _clip8(b, b.op("MatMul", wy, x)), wx_t))
    else:
        out = _clip8(b, b.op("MatMul", wy, _clip8(b, b.op("MatMul", x, wx_t))))
    return b.op("Unsqueeze", b.op("Cast", out, to=TensorProto.UINT8), b.const([0], np.int64))


def _branch(prefix: str, build, shape: list[int]) -> onnx.GraphProto:
    """A subgraph for `If` whose one output is what `build(builder)` returns."""
    sub = Builder(prefix)
    result = build(sub)
    sub.nodes.append(helper.make_node("Identity", [result], [f"{prefix}out"]))
    return sub.graph(prefix.rstrip("/"), [helper.make_tensor_value_info(f"{prefix}out", TensorProto.UINT8, shape)])


def preprocess_nodes(spec: PreprocessSpec, rgb: str, out: str, prefix: str = "pre/") -> Builder:
    """Nodes (and constants) from uint8 `rgb` [H, W, 3] to `out`, the model input [1, *spec.input_shape]."""
    if spec.interpolation not in SUPPORT:
        raise ValueError(f"interpolation {spec.interpolation!r} has no phone graph (bicubic and bilinear do)")
    b = Builder(prefix)
    g = _geometry(b, rgb, spec)
    window = b.op("Slice", rgb, g["start"], g["end"], b.const([0, 1], np.int64))  # [Lh, Lw, 3]
    window = b.op("Unsqueeze", b.op("Transpose", window, perm=[2, 0, 1]), b.const([0], np.int64), hint="window")
    shape = [1, 3, spec.crop, spec.crop]

    def by_order(route, name: str):
        def build(sub: Builder) -> str:
            branches = {v: _branch(f"{sub.prefix}{'v' if v else 'h'}/",
                                   lambda bb, v=v: route(bb, window, g, spec, v), shape) for v in (True, False)}
            return sub.op("If", g["vfirst"], then_branch=branches[True], else_branch=branches[False])
        return _branch(f"{prefix}{name}/", build, shape)

    pixels = b.op("If", g["small"], then_branch=by_order(_matrix_route, "matrix"),
                  else_branch=by_order(_resize_route, "resize"), hint="pixels")  # [1, 3, crop, crop] uint8
    # normalize exactly as preprocessing.normalize: float32 x * (scale / (std * 255)) + (-mean / std)
    std = np.asarray(spec.std, dtype=np.float32)
    mul = (spec.scale / (std * 255.0)).astype(np.float32)[:, None, None]
    add = (-np.asarray(spec.mean, dtype=np.float32) / std).astype(np.float32)[:, None, None]
    x = b.op("Mul", b.op("Cast", pixels, to=TensorProto.FLOAT), b.const(mul))
    if spec.layout == "NCHW":
        b.nodes.append(helper.make_node("Add", [x, b.const(add)], [out], name=b.name("Add")))
    else:
        b.nodes.append(helper.make_node("Transpose", [b.op("Add", x, b.const(add))], [out], perm=[0, 2, 3, 1],
                                        name=b.name("Transpose")))
    return b
