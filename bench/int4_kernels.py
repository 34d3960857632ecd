"""The packed kernels the server uses (PyTorch's `_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm`,
bf16 activations) against onnxruntime's `MatMulNBits` (int8 activations, the llama.cpp way), on the
default model's own weights: time of one decode step's matrix products (one decoder layer's fused q/k/v,
o, fused gate/up and down, times the layer count, plus the output head) at 1 and 8 rows and 1 and 2
threads, rounds interleaved; then the perplexity of the neutral text through each. Not a dependency of
the server: needs `pip install onnxruntime onnx` and says so when they are missing.

    python bench/int4_kernels.py                 # rows 1 8, threads 1 2
    python bench/int4_kernels.py --rows 1 --threads 1 --no-perplexity

Q4_1 weights are `code * scale + low` per group of 32; `MatMulNBits` takes `(code - zero) * scale`
with an integer zero (a float zero sends it to a slow path), so `low` is applied as
`(sum of the group's inputs) @ low`, a (rows, K/32) x (K/32, N) product inside the same graph.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.backends.transformers.fastdecode import _projection  # noqa: E402
from server.backends.transformers.packed import GROUP, PackedLinear, int4_groups, pack_model  # noqa: E402
from steering_vectors.core.models import load_model  # noqa: E402
from steering_vectors.training.evaluate import neutral_text  # noqa: E402

Kernel = Callable[[torch.Tensor], torch.Tensor]


def ort_session(nodes: list, inits: list, k: int, n: int, threads: int):  # noqa: ANN201
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # spinning threads starve torch
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(session, k: int, n: int) -> Kernel:  # noqa: ANN001
    def call(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, k).float().contiguous().numpy()
        out = torch.from_numpy(session.run(None, {"A": rows})[0])
        return out.reshape(*x.shape[:-1], n).to(x.dtype)

    return call


def nbits_node(k: int, n: int, bits: int, output: str):  # noqa: ANN201
    """MatMulNBits over inputs A, B (codes), S (scales), Z (zeros), int8 compute (accuracy level 4)."""
    from onnx import helper

    return helper.make_node(
        "MatMulNBits", ["A", "B", "S", "Z"], [output], domain="com.microsoft",
        K=k, N=n, bits=bits, block_size=GROUP, accuracy_level=4,
    )  # fmt: skip


def ort_int4(linears: list[nn.Module], threads: int) -> Kernel:
    """One MatMulNBits (4 bits, int8 compute) for linears sharing an input, outputs concatenated."""
    import numpy as np
    from onnx import helper, numpy_helper

    weights = torch.cat([m.weight.detach().float() for m in linears])
    codes, scale, low = int4_groups(weights)
    n, k = codes.shape
    nibbles = codes.reshape(n, k // GROUP, GROUP).to(torch.uint8)
    inits = [
        numpy_helper.from_array((nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).contiguous().numpy(), "B"),
        numpy_helper.from_array(scale.contiguous().numpy(), "S"),
        numpy_helper.from_array(np.zeros((n, (k // GROUP + 1) // 2), dtype=np.uint8), "Z"),
        numpy_helper.from_array(low.T.contiguous().numpy(), "L"),
        numpy_helper.from_array(np.array([-1, k // GROUP, GROUP], dtype=np.int64), "groups"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last"),
    ]
    nodes = [
        nbits_node(k, n, 4, "Q"),
        helper.make_node("Reshape", ["A", "groups"], ["Ag"]),
        helper.make_node("ReduceSum", ["Ag", "last"], ["As"], keepdims=0),
        helper.make_node("MatMul", ["As", "L"], ["Lo"]),
        helper.make_node("Add", ["Q", "Lo"], ["Y"]),
    ]
    return _run(ort_session(nodes, inits, k, n, threads), k, n)


def ort_int8(head: PackedLinear, threads: int) -> Kernel:
    """The int8 head (per-row scale) as an 8-bit MatMulNBits with zero 128 and int8 compute."""
    import numpy as np
    from onnx import numpy_helper

    n, k = head.packed.shape
    codes = (head.packed.to(torch.int16) + 128).to(torch.uint8).reshape(n, k // GROUP, GROUP)
    scales = head.scales.float().unsqueeze(1).expand(n, k // GROUP).contiguous()
    inits = [
        numpy_helper.from_array(codes.contiguous().numpy(), "B"),
        numpy_helper.from_array(scales.numpy(), "S"),
        numpy_helper.from_array(np.full((n, k // GROUP), 128, dtype=np.uint8), "Z"),
    ]
    node = nbits_node(k, n, 8, "Y")
    return _run(ort_session([node], inits, k, n, threads), k, n)


def step_products(model: nn.Module, threads: int) -> dict[str, list[Kernel]]:
    """The products of one decode step (layer 0's, called once per layer, and the head) per backend."""
    layer = model.get_decoder().layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    qkv, _ = _projection([attn.q_proj, attn.k_proj, attn.v_proj])
    gate_up, _ = _projection([mlp.gate_proj, mlp.up_proj])
    return {
        "torch": [qkv, attn.o_proj, gate_up, mlp.down_proj, model.lm_head],  # type: ignore[list-item]
        "onnxruntime": [
            ort_int4([attn.q_proj, attn.k_proj, attn.v_proj], threads),
            ort_int4([attn.o_proj], threads),
            ort_int4([mlp.gate_proj, mlp.up_proj], threads),
            ort_int4([mlp.down_proj], threads),
            ort_int8(model.lm_head, threads),
        ],
    }


def time_step(products: list[Kernel], layers: int, rows: int, steps: int) -> float:
    """ms for `steps` steps' worth of products: the four layer products `layers` times, then the head."""
    inputs = [torch.randn(rows, 576 if i != 3 else 1536) for i in range(4)]
    head_input = torch.randn(rows, 576)
    start = time.perf_counter()
    for _ in range(steps):
        for _ in range(layers):
            for product, x in zip(products[:4], inputs, strict=True):
                product(x)
        products[4](head_input)
    return (time.perf_counter() - start) / steps * 1000


def perplexities(model: nn.Module, tokenizer: object, threads: int) -> dict[str, float]:
    """Neutral-text perplexity with every linear on float weights, the torch kernels, onnxruntime's."""
    ids = tokenizer(neutral_text(), return_tensors="pt").input_ids[:, :512]  # type: ignore[operator]
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    kernels = {id(m): ort_int4([m], threads) if m.bits == 4 else ort_int8(m, threads) for m in packed}
    backends: dict[str, Callable[[PackedLinear, torch.Tensor], torch.Tensor]] = {
        "float": lambda m, x: F.linear(x, m.weight, m.bias),
        "torch": lambda m, x: m.packed_forward(x),
        "onnxruntime": lambda m, x: kernels[id(m)](x) + (m.bias if m.bias is not None else 0),
    }
    result = {}
    for name, forward in backends.items():
        for m in packed:
            m.forward = (lambda f, mod: lambda x: f(mod, x))(forward, m)  # type: ignore[method-assign]
        with torch.inference_mode():
            logits = model(ids).logits[0, :-1]
        result[name] = math.exp(float(F.cross_entropy(logits.float(), ids[0, 1:])))
    for m in packed:
        del m.forward  # back to the class's forward
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-perplexity", action="store_true")
    args = parser.parse_args(argv)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime and onnx are not installed: pip install onnxruntime onnx")
        return 1

    loaded = load_model(None, dtype="float32")
    model = loaded.model
    print(f"weights: {pack_model(model, 'auto', max_rows=10**6).summary()}")
    layers = int(model.config.num_hidden_layers)
    ratios: dict[str, float] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        backends = step_products(model, threads)
        for rows in args.rows:
            times: dict[str, list[float]] = {name: [] for name in backends}
            with torch.inference_mode():
                for _ in range(args.rounds):
                    for name, products in backends.items():
                        time_step(products, layers, rows, 1)
                        times[name].append(time_step(products, layers, rows, args.steps))
            best = {name: min(values) for name, values in times.items()}
            ratios[f"torch/onnxruntime@{rows} rows, {threads} threads"] = best["torch"] / best["onnxruntime"]
            print(
                f"threads {threads} rows {rows:>2}: torch {best['torch']:7.2f} ms  onnxruntime "
                f"{best['onnxruntime']:7.2f} ms  (median {statistics.median(times['torch']):.2f} / "
                f"{statistics.median(times['onnxruntime']):.2f})"
            )
    print("ratios (one step's products, torch kernels / onnxruntime kernels):")
    for key, value in ratios.items():
        print(f"  {key}: {value:.3f}")
    if not args.no_perplexity:
        torch.set_num_threads(max(args.threads))
        ppl = perplexities(model, loaded.tokenizer, max(args.threads))
        print("neutral-text perplexity: " + "  ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
        for name in ("torch", "onnxruntime"):
            print(f"  {name} / float: {ppl[name] / ppl['float']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
