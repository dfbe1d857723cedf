"""A stand-in for TensorRT's IExecutionContext that runs the engine's own ONNX (kept with
FLAGC_TRT_KEEP_ONNX=1) with onnxruntime on the CPU, through the same raw tensor addresses the
TensorRT runtime binds. It lets tests cover the runtime's binding and KV plumbing without a GPU.
"""

import ctypes

import numpy as np


class OrtContext:
    """What TrtBinding uses of an IExecutionContext, computed by onnxruntime on host pointers."""

    def __init__(self, onnx_path, info):
        """`info`: the engine's manifest section (manifest["tensorrt"] or a companion's)."""
        import onnxruntime as ort

        self.sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        io = info["io"]
        self.dtypes = {s["name"]: np.dtype({"f32": np.float32, "f16": np.float16,
                                            "i64": np.int64}[s["dtype"]])
                       for s in io["inputs"] + io["outputs"]}
        self.inputs = [s["name"] for s in io["inputs"]]
        self.profile = info["profiles"][0]
        self.shapes, self.addr, self.result = {}, {}, None

    def set_input_shape(self, name, shape):
        p = self.profile[name]
        if not all(a <= s <= b for a, s, b in zip(p["min"], shape, p["max"])):
            return False
        self.shapes[name], self.result = tuple(shape), None
        return True

    def set_tensor_address(self, name, ptr):
        assert ptr, f"null address for {name}"
        self.addr[name], self.result = ptr, None

    def _read(self, name):
        shape, dt = self.shapes[name], self.dtypes[name]
        n = int(np.prod(shape)) * dt.itemsize
        if not n:
            return np.zeros(shape, dt)
        return np.frombuffer((ctypes.c_char * n).from_address(self.addr[name]),
                             dtype=dt).reshape(shape).copy()

    def _run(self):
        if self.result is None:
            names = [o.name for o in self.sess.get_outputs()]
            vals = self.sess.run(names, {n: self._read(n) for n in self.inputs})
            self.result = dict(zip(names, vals))
        return self.result

    def get_tensor_shape(self, name):
        return self._run()[name].shape

    def execute_async_v3(self, stream):
        for name, value in self._run().items():
            ctypes.memmove(self.addr[name], value.ctypes.data, value.nbytes)
        return True
