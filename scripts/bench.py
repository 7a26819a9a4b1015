"""Side-by-side forward benchmark: eqx_models vs HF Flax vs HF PyTorch on the same weights.

    python scripts/bench.py                  # GPT-Neo-125M shape, 1 x 512 tokens
    python scripts/bench.py --runs 10 --seq 512 --markdown

Random weights are written once as a HF checkpoint and loaded by all three. Prints median
forward times, compile times and ratios; also our compile time at two depths (scan over
layers keeps it flat). Not a test: numbers depend on the machine.
"""

import argparse
import collections
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import jax
import numpy as np


@dataclass
class Case:
    name: str
    hf_config: Callable[[int], object]  # num_layers -> transformers config
    torch_class: str
    flax_class: str
    layers: int  # of the timed forward


#: Issue 18's targets: forward time over HF Flax's; our compile time at 24 layers over 12.
FORWARD_TARGET = 0.95
COMPILE_LAYERS = (12, 24)
COMPILE_TARGET = 1.3


def gpt_neo_125m(num_layers: int):
    import transformers

    return transformers.GPTNeoConfig(
        vocab_size=50257,
        hidden_size=768,
        num_layers=num_layers,
        num_heads=12,
        max_position_embeddings=2048,
        attention_types=[[["global", "local"], num_layers // 2]],
        window_size=256,
    )


def gemma_2b_width(num_layers: int):
    import transformers

    return transformers.GemmaConfig(
        vocab_size=256000,
        hidden_size=2048,
        intermediate_size=16384,
        num_hidden_layers=num_layers,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        hidden_act="gelu_pytorch_tanh",
    )


def xglm_564m_width(num_layers: int):
    import transformers

    return transformers.XGLMConfig(
        vocab_size=256008,
        d_model=1024,
        ffn_dim=4096,
        num_layers=num_layers,
        attention_heads=16,
        dropout=0.0,
        attention_dropout=0.0,
    )


CASES = {
    "gpt_neo": Case("GPT-Neo-125M", gpt_neo_125m, "GPTNeoForCausalLM", "FlaxGPTNeoForCausalLM", 12),
    "gemma": Case("Gemma-2B-width (2 layers, MQA)", gemma_2b_width, "GemmaForCausalLM", "FlaxGemmaForCausalLM", 2),
    "xglm": Case("XGLM-564M-width (6 layers)", xglm_564m_width, "XGLMForCausalLM", "FlaxXGLMForCausalLM", 6),
}


def interleaved(
    fns: dict[Hashable, Callable[[], object]], runs: int
) -> tuple[dict[Hashable, float], dict[Hashable, float]]:
    """First-call seconds and median seconds of each function, the runs interleaved so that
    load from elsewhere on the machine hits every contender alike."""
    first, times = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return first, {name: statistics.median(t) for name, t in times.items()}


def write_checkpoint(case: Case, num_layers: int, folder: str) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    getattr(transformers, case.torch_class)(case.hf_config(num_layers)).save_pretrained(folder)


def ours_forward(folder: str, ids: np.ndarray, *, separate: bool = False) -> Callable[[], object]:
    import equinox as eqx

    import eqx_models

    model = eqx_models.from_pretrained(folder)
    if separate:
        model = eqx_models.separate_layers(model)
    forward = eqx.filter_jit(lambda m, i: jax.vmap(m)(i))
    tokens = jax.numpy.asarray(ids)
    return lambda: forward(model, tokens).block_until_ready()


def flax_forward(case: Case, folder: str, ids: np.ndarray) -> Callable[[], object]:
    import transformers

    with jax.numpy_dtype_promotion("standard"):
        model = getattr(transformers, case.flax_class).from_pretrained(folder, from_pt=True)
        forward = jax.jit(lambda params, i: model(i, params=params).logits)
        tokens = jax.numpy.asarray(ids)

    def run():
        with jax.numpy_dtype_promotion("standard"):
            return forward(model.params, tokens).block_until_ready()

    return run


def torch_forward(case: Case, folder: str, ids: np.ndarray) -> Callable[[], object]:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = getattr(transformers, case.torch_class).from_pretrained(folder).eval()
    tokens = torch.tensor(ids)

    def forward():
        with torch.no_grad():
            return model(tokens).logits

    return forward


def compile_seconds(case: Case, num_layers: int, seq: int, repeats: int = 3, *, separate: bool = False) -> float:
    """Lowering + XLA compile of our forward at `num_layers`, from shapes only (best of
    `repeats`, each a fresh compile); `separate`: with the layers stored separately."""
    import equinox as eqx

    from eqx_models import separate_layers
    from eqx_models.models import FAMILIES

    family = FAMILIES[case.hf_config(2).model_type]
    config = family.config.from_hf_config(case.hf_config(num_layers).to_dict())
    cls = dict(family.by_name())[case.torch_class]
    build = (lambda key: separate_layers(cls(config, key=key))) if separate else (lambda key: cls(config, key=key))
    shapes = eqx.nn.inference_mode(eqx.filter_eval_shape(build, jax.random.key(0)))
    params, static = eqx.partition(shapes, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    ids = jax.ShapeDtypeStruct((1, seq), jax.numpy.int32)
    best = float("inf")
    for _ in range(repeats):
        forward = jax.jit(lambda p, i: jax.vmap(eqx.combine(p, static))(i))
        start = time.perf_counter()
        forward.lower(params, ids).compile()
        best = min(best, time.perf_counter() - start)
    return best


def matrix_product_seconds(forward: Callable, *args, repeats: int = 3) -> float:
    """The matrix products of `forward(*args)` each timed alone: every `dot_general` of its
    program (a scan body's once per iteration), on random operands of its shapes, best of
    `repeats`, summed: the library products' share of a forward, which every implementation
    on this machine pays (HF Flax's products are the same). A product run alone also writes
    a fresh output buffer (for an LM head, hundreds of MB of first-touched pages), so a whole
    forward can come in a few percent under this sum; the rest of a forward (norms,
    softmax, activations, copies) is what lies above it."""
    from jax import lax
    from jax.extend import core

    counts: collections.Counter = collections.Counter()

    def visit(jaxpr, times: int) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                lhs, rhs = (v.aval for v in eqn.invars)
                params = (eqn.params["dimension_numbers"], eqn.params.get("preferred_element_type"))
                counts[(lhs.shape, lhs.dtype, rhs.shape, rhs.dtype, params)] += times
            inner = times * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    if isinstance(sub, core.ClosedJaxpr):
                        visit(sub.jaxpr, inner)
                    elif isinstance(sub, core.Jaxpr):
                        visit(sub, inner)

    visit(jax.make_jaxpr(forward)(*args).jaxpr, 1)
    total = 0.0
    for (lhs_shape, lhs_dtype, rhs_shape, rhs_dtype, (dims, out_dtype)), count in counts.items():
        lhs = jax.random.normal(jax.random.key(0), lhs_shape, lhs_dtype)
        rhs = jax.random.normal(jax.random.key(1), rhs_shape, rhs_dtype)
        product = jax.jit(
            lambda a, b, dims=dims, out=out_dtype: lax.dot_general(a, b, dims, preferred_element_type=out)
        )
        product(lhs, rhs).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            product(lhs, rhs).block_until_ready()
            best = min(best, time.perf_counter() - start)
        total += count * best
        del lhs, rhs
    return total


def our_products_seconds(folder: str, ids: np.ndarray) -> float:
    """`matrix_product_seconds` of our (default, stacked) forward."""
    import equinox as eqx

    import eqx_models

    params, static = eqx.partition(eqx_models.from_pretrained(folder), eqx.is_array)
    return matrix_product_seconds(lambda p, i: jax.vmap(eqx.combine(p, static))(i), params, jax.numpy.asarray(ids))


def run_case(case: Case, seq: int, runs: int, root: str) -> list[tuple[str, str]]:
    ids = np.random.default_rng(0).integers(0, 1000, (1, seq)).astype(np.int32)
    shallow = os.path.join(root, case.name.split()[0])
    write_checkpoint(case, case.layers, shallow)
    # The JAX contenders alternate run by run. PyTorch runs on its own afterwards: its
    # OpenMP threads keep spinning after each call and would slow whatever runs next.
    contenders = {
        "ours": ours_forward(shallow, ids),
        "separate": ours_forward(shallow, ids, separate=True),
        "flax": flax_forward(case, shallow, ids),
    }
    first, median = interleaved(contenders, runs)
    _, torch_median = interleaved({"torch": torch_forward(case, shallow, ids)}, runs)
    median.update(torch_median)
    products = our_products_seconds(shallow, ids)
    ours, flax, torch_time = median["ours"], median["flax"], median["torch"]
    ours_first, flax_first = first["ours"], first["flax"]
    shallow_layers, deep_layers = COMPILE_LAYERS
    compile_shallow, compile_deep = (compile_seconds(case, n, seq) for n in COMPILE_LAYERS)
    separate_shallow, separate_deep = (compile_seconds(case, n, seq, separate=True) for n in COMPILE_LAYERS)
    label = f"{case.name} forward 1x{seq}"
    return [
        (f"{label}: eqx_models", f"{ours * 1e3:.0f} ms"),
        (f"{label}: eqx_models, layers separate", f"{median['separate'] * 1e3:.0f} ms"),
        (f"{label}: HF Flax", f"{flax * 1e3:.0f} ms"),
        (f"{label}: HF PyTorch", f"{torch_time * 1e3:.0f} ms"),
        (f"{label}: ratio ours / HF Flax (target <= {FORWARD_TARGET})", f"{ours / flax:.2f}"),
        (f"{label}: ratio ours, layers separate / HF Flax", f"{median['separate'] / flax:.2f}"),
        (f"{label}: ratio ours / HF PyTorch", f"{ours / torch_time:.2f}"),
        (f"{label}: its matrix products, each timed alone, summed (the limit)", f"{products * 1e3:.0f} ms"),
        (
            f"{label}: time / that limit: ours, layers separate, HF Flax",
            f"{ours / products:.2f}, {median['separate'] / products:.2f}, {flax / products:.2f}",
        ),
        (f"{case.name} first call (compile + run): ours / HF Flax", f"{ours_first:.2f} s / {flax_first:.2f} s"),
        (
            f"{case.name} compile {shallow_layers} layers / {deep_layers} layers (from shapes)",
            f"{compile_shallow:.2f} s / {compile_deep:.2f} s",
        ),
        (
            f"{case.name} compile ratio {deep_layers}/{shallow_layers} layers (target <= {COMPILE_TARGET})",
            f"{compile_deep / compile_shallow:.2f}",
        ),
        (
            f"{case.name} compile {shallow_layers} / {deep_layers} layers, layers separate",
            f"{separate_shallow:.2f} s / {separate_deep:.2f} s (ratio {separate_deep / separate_shallow:.2f})",
        ),
    ]


def big_bird_rows(root: str, runs: int) -> list[tuple[str, str]]:
    """Base-width BigBird encoder (hidden 768, 12 heads, 2 layers, block 64, 3 random blocks):
    ours block-sparse and full attention, and HF Flax block-sparse, at 1024 and 4096 tokens.
    Memory is XLA's temporary buffer size for the compiled forward."""
    import equinox as eqx
    import torch
    import transformers

    import eqx_models

    folder = os.path.join(root, "big_bird")
    config = transformers.BigBirdConfig(
        vocab_size=50358,
        hidden_size=768,
        num_hidden_layers=2,
        num_attention_heads=12,
        intermediate_size=3072,
        attention_type="block_sparse",
        block_size=64,
        num_random_blocks=3,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    transformers.BigBirdModel(config).save_pretrained(folder)
    with jax.numpy_dtype_promotion("standard"):
        flax_model = transformers.FlaxBigBirdModel.from_pretrained(folder, from_pt=True)
    full_folder = os.path.join(root, "big_bird_full")  # the same weights, `original_full` attention
    shutil.copytree(folder, full_folder)
    with open(os.path.join(full_folder, "config.json")) as f:
        full_config = json.load(f)
    with open(os.path.join(full_folder, "config.json"), "w") as f:
        json.dump({**full_config, "attention_type": "original_full"}, f)
    contenders = {}
    for attention, path in (("block_sparse", folder), ("original_full", full_folder)):
        model = eqx_models.from_pretrained(path)
        assert model.config.attention_type == attention
        params, static = eqx.partition(model, eqx.is_array)
        contenders[f"ours {attention}"] = (
            jax.jit(lambda p, i, s=static: jax.vmap(lambda x: eqx.combine(p, s)(x).last_hidden_state)(i)),
            params,
        )
    contenders["HF Flax block_sparse"] = (
        jax.jit(lambda p, i: flax_model(i, params=p).last_hidden_state),
        flax_model.params,
    )
    rows, calls = [], {}
    for length in (1024, 4096):
        ids = jax.numpy.asarray(np.random.default_rng(0).integers(5, 1000, (1, length)), jax.numpy.int32)
        for name, (fn, params) in contenders.items():
            with jax.numpy_dtype_promotion("standard"):
                compiled = fn.lower(params, ids).compile()
            memory = compiled.memory_analysis().temp_size_in_bytes / 2**20
            rows.append((f"BigBird-base 2 layers {length} tokens: {name} temporary memory", f"{memory:.0f} MiB"))
            calls[name, length] = lambda c=compiled, p=params, i=ids: c(p, i).block_until_ready()
    # both lengths in one interleaved series, so that the growth ratio sees the same load as the others
    _, times = interleaved(calls, runs)
    for (name, length), seconds in times.items():
        rows.append((f"BigBird-base 2 layers {length} tokens: {name}", f"{seconds * 1e3:.0f} ms"))
    sparse, full, flax = (times[n, 4096] for n in ("ours block_sparse", "ours original_full", "HF Flax block_sparse"))
    rows += [
        ("BigBird 4096: full / block-sparse (target >= 3)", f"{full / sparse:.2f}"),
        ("BigBird 4096: ours block-sparse / HF Flax block-sparse (target <= 0.8)", f"{sparse / flax:.2f}"),
        ("BigBird block-sparse time 4096 / 1024 (target <= 4.3)", f"{sparse / times['ours block_sparse', 1024]:.2f}"),
    ]
    return rows


def long_t5_rows(root: str, runs: int) -> list[tuple[str, str]]:
    """Base-width LongT5 encoder (d_model 768, 12 heads, 2 layers, transient-global, local
    radius 127, global blocks of 16) at 2k, 8k and 16k tokens: ours against HF PyTorch
    (HF's Flax LongT5 no longer runs on current JAX)."""
    import equinox as eqx
    import torch
    import transformers

    import eqx_models

    folder = os.path.join(root, "longt5")
    config = transformers.LongT5Config(
        vocab_size=32128,
        d_model=768,
        d_kv=64,
        d_ff=2048,
        num_layers=2,
        num_heads=12,
        encoder_attention_type="transient-global",
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
    )
    torch.manual_seed(0)
    transformers.LongT5EncoderModel(config).save_pretrained(folder)
    model = eqx_models.from_pretrained(folder)
    params, static = eqx.partition(model, eqx.is_array)
    forward = jax.jit(lambda p, i: jax.vmap(eqx.combine(p, static))(i))
    torch.set_num_threads(os.cpu_count() or 1)
    reference = transformers.LongT5EncoderModel.from_pretrained(folder).eval()
    rows, per_token, ratio, memory = [], {}, {}, {}
    for length in (2048, 8192, 16384):
        ids = np.random.default_rng(0).integers(5, 1000, (1, length)).astype(np.int32)
        compiled = forward.lower(params, jax.numpy.asarray(ids)).compile()
        memory[length] = compiled.memory_analysis().temp_size_in_bytes / 2**30
        tokens = jax.numpy.asarray(ids)

        def hf_forward(ids=ids):
            with torch.no_grad():
                return reference(torch.tensor(ids, dtype=torch.long)).last_hidden_state

        # interleaved, so that load from elsewhere on the machine hits both alike
        _, times = interleaved(
            {"ours": lambda c=compiled: c(params, tokens).block_until_ready(), "hf": hf_forward}, runs
        )
        per_token[length], ratio[length] = times["ours"] / length, times["ours"] / times["hf"]
        rows += [
            (f"LongT5-base TGlobal 2 layers {length} tokens: eqx_models", f"{times['ours'] * 1e3:.0f} ms"),
            (f"LongT5-base TGlobal 2 layers {length} tokens: HF PyTorch", f"{times['hf'] * 1e3:.0f} ms"),
            (f"LongT5 {length}: ours / HF PyTorch", f"{ratio[length]:.2f}"),
            (f"LongT5 {length}: XLA temporary memory", f"{memory[length]:.2f} GiB"),
        ]
    rows += [
        ("LongT5 time per token 16k / 2k (target <= 1.6)", f"{per_token[16384] / per_token[2048]:.2f}"),
        ("LongT5 ours / HF PyTorch at 16k (target <= 0.5)", f"{ratio[16384]:.2f}"),
        ("LongT5 XLA temporary memory at 16k (target <= 2.5 GiB)", f"{memory[16384]:.2f} GiB"),
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=[*CASES, "big_bird", "longt5"], choices=[*CASES, "big_bird", "longt5"]
    )
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    rows = []
    with tempfile.TemporaryDirectory(prefix="eqx-bench-") as root:
        special = {"big_bird": big_bird_rows, "longt5": long_t5_rows}
        for name in args.models:
            if name in special:
                rows += special[name](root, args.runs)
            else:
                rows += run_case(CASES[name], args.seq, args.runs, root)
    print(f"machine: {os.cpu_count()} CPU cores, jax {jax.__version__}, backend {jax.default_backend()}")
    if args.markdown:
        print("| measurement | value |\n|---|---|")
        for what, value in rows:
            print(f"| {what} | {value} |")
    else:
        width = max(len(what) for what, _ in rows)
        for what, value in rows:
            print(f"{what:<{width}}  {value}")


if __name__ == "__main__":
    main()
