"""Checks shared by the tests of the elementwise and stencil kernels (LayerNorm2d, the gates,
the depthwise convolution): outputs and every gradient against the float64 reference math."""
from __future__ import annotations

import os
import re

import torch

import sipl_fast
from sipl_fast import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
# Max error allowed, relative to max(|expected|, 1), per storage dtype (interpreter tests).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}


# The output and the gradients of projection_inputs' tensors, in order.
PROJECTION_NAMES = ["out", "dx", "dpointwise", "dpointwise_bias", "ddepthwise", "ddepthwise_bias"]


def projection_inputs(batch, channels, hidden, height, width, dtype, biases=True):
    """[x, 1x1 weight, its bias, depthwise weight, its bias] of a projection to ``hidden``
    channels (biases None without ``biases``), the weights scaled to keep outputs O(1)."""
    tensors = [torch.randn(batch, channels, height, width, device=DEVICE),
               torch.randn(hidden, channels, 1, 1, device=DEVICE) / channels ** 0.5,
               torch.randn(hidden, device=DEVICE) if biases else None,
               torch.randn(hidden, 1, 3, 3, device=DEVICE) / 3,
               torch.randn(hidden, device=DEVICE) if biases else None]
    return [None if t is None else t.to(dtype) for t in tensors]


def outputs_and_grads(fn, inputs, cotangent):
    """[fn(*inputs), d<cotangent, out>/d(each tensor input)] with the inputs as fresh leaves."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [t for t in leaves if t is not None], cotangent.to(out.dtype))
    return [out.detach(), *grads]


def float64_truth(reference_fn, inputs, cotangent):
    """The reference math on float64 copies of the (already rounded) inputs."""
    return outputs_and_grads(reference_fn, [None if t is None else t.double() for t in inputs],
                              cotangent.double())


def max_errors(got, expected):
    return [(g.double() - e).abs().max().item() if g.numel() else 0.0 for g, e in zip(got, expected)]


def assert_close(names, got, expected, tol, term_scales=None):
    """Each error at most tol times max(|expected|, 1), or, for the outputs named in
    term_scales, tol times the size of the terms that cancel in them (where the result is
    small but its terms are not, the terms decide the rounding error)."""
    assert [g.shape for g in got] == [e.shape for e in expected]
    for name, g, e, err in zip(names, got, expected, max_errors(got, expected)):
        assert torch.isfinite(g).all(), f"{name} is not finite"
        scale = max(e.abs().max().item() if e.numel() else 0.0, (term_scales or {}).get(name, 0.0), 1.0)
        assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def on_kernels(op):
    """op on the triton backend, kernels forced (on CUDA the dispatch otherwise prefers the
    torch formulation for these ops, see sipl_fast.ops._TORCH_FORMULATION_ON_CUDA)."""
    def run(*args):
        with sipl_fast.use_backend("triton"), ops.kernels_forced("all"):
            return op(*args)
    return run


def reference_rule(run, reference_fn, inputs, names, floor: float = 1e-6):
    """FlashAttention's rule: the kernel's error against float64 is at most twice that of the
    reference math run in the inputs' own dtype, plus floor * max(|truth|, 1). It follows the
    conditioning of the problem (e.g. LayerNorm of nearly equal channels), where a fixed
    tolerance cannot."""
    out_dtype = reference_fn(*inputs).dtype
    cotangent = torch.randn(reference_fn(*inputs).shape, device=DEVICE).to(out_dtype)
    truth = float64_truth(reference_fn, inputs, cotangent)
    ours = max_errors(outputs_and_grads(run, inputs, cotangent), truth)
    theirs = max_errors(outputs_and_grads(reference_fn, inputs, cotangent), truth)
    for name, mine, base, t in zip(names, ours, theirs, truth):
        bound = 2 * base + floor * max(t.abs().max().item(), 1.0)
        assert mine <= bound, f"{name}: kernel error {mine:.3g} vs the reference's {base:.3g} in {out_dtype}"


def compile_sm90(kernel, constants: dict, pointer_type, warps: int, stages: int = 1, aligned=()):
    """``kernel`` compiled for sm_90 without a GPU (the interpreter checks none of what the
    compiler does): ``constants`` as its constexprs, each pointer argument of the type
    ``pointer_type(name)`` gives ("*bf16", "*fp32", ...), the others i32; the arguments named
    in ``aligned`` specialised as divisible by 16, as Triton's launcher does for such values.
    Needs TRITON_INTERPRET unset before the kernels are imported."""
    import triton
    from triton.backends.compiler import GPUTarget
    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    signature = {name: "constexpr" if name in constants else (pointer_type(name) if name.endswith("_ptr") else "i32")
                 for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names) if name in aligned}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    options = backend.parse_options({"num_warps": warps, "num_stages": stages})
    return triton.compile(source, target=target, options=options.__dict__)


def compiled_proxy_configs(head_dims=(96, 384), dtypes=("bf16", "fp32")):
    """Yields (kernel name, dtype, head size, (rows, loop rows, warps, stages), compiled kernel
    or the exception its compile raised) for each proxy-attention kernel and each GPU autotune
    config of its tile class, compiled for sm_90 as SIPL launches them: NCHW inputs (unit token
    strides), token counts that fill every block, other strides and sizes divisible by 16.
    Needs TRITON_INTERPRET unset before the kernels are imported."""
    import itertools

    from sipl_fast.kernels import proxy_attention as kernels
    stats = {"temp_ptr", "rq_ptr", "rk_ptr", "lse_ptr", "delta_ptr", "dtau_ptr"}
    counts = {"NUM_HEADS", "NUM_SPLITS", "BATCHES_PER_KV", "BATCHES_PER_Q"}
    for kernel, head_dim, dtype in itertools.product(
            (kernels._forward_kernel, kernels._backward_dkdv_kernel, kernels._backward_dq_kernel), head_dims, dtypes):
        fn, (owned, loop) = kernel.fn, kernel.tile_names
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        da, db = kernels.head_chunks(head_dim)
        for shape in kernel.shapes[kernels._tile_class(head_dim, torch_dtype)]:
            m, n, warps, stages = shape
            constants = dict(D=head_dim, DA=da, DB=db, DOT_PRECISION=kernels._dot_precision(torch_dtype, False),
                             FULL_Q=True, FULL_KV=True, **{owned: m, loop: n},
                             **{a: 1 for a in fn.arg_names if a.endswith("_st")})
            if "FINAL" in fn.arg_names:
                constants["FINAL"] = True
            aligned = [a for a in fn.arg_names if a not in constants and a not in counts]
            try:
                compiled = compile_sm90(fn, constants, lambda a: "*fp32" if a in stats else f"*{dtype}", warps, stages,
                                        aligned)
            except Exception as error:  # noqa: BLE001 - handed to the caller with its config
                compiled = error
            yield fn.__name__, dtype, head_dim, shape, compiled


def ptxas_info(compiled) -> str:
    """ptxas -v's report on a kernel compiled for sm_90 (compile_sm90): registers, spills and
    the performance notes Triton does not show, among them C7515, "wgmma.mma_async
    instructions are serialized" (each tensor-core product then waits for the one before)."""
    import subprocess
    import tempfile
    ptxas = _triton_tool("ptxas")
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(compiled.asm["ptx"])
        result = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", source, "-o", os.path.join(folder, "kernel.o")],
                                capture_output=True, text=True, check=True)
    return result.stdout + result.stderr


_SASS_ADDRESS = re.compile(r"/\*([0-9a-f]{4,})\*/")
_SASS_OPCODE = re.compile(r"\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)")


def _triton_tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass(compiled) -> list[tuple[int, str]]:
    """(address, text) of each instruction of a kernel compiled for sm_90, in order (nvdisasm,
    shipped with Triton); branch labels come as (-1, name)."""
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        cubin = os.path.join(folder, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        listing = subprocess.run([_triton_tool("nvdisasm"), "-c", cubin], capture_output=True, text=True,
                                 check=True).stdout
    code = []
    for line in listing.splitlines():
        label = re.match(r"\s*\.(L_x_\d+):", line)
        address = _SASS_ADDRESS.search(line)
        if label:
            code.append((-1, label.group(1)))
        elif address and _SASS_OPCODE.search(line):
            code.append((int(address.group(1), 16), line))
    return code


def opcode(text: str) -> str:
    """The opcode of a SASS instruction's text, without its modifiers (HGMMA, LDG, ...)."""
    return _SASS_OPCODE.search(text).group(2).split(".")[0]


def _loops(code: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(index of the label, index of the backward branch) of each loop in ``sass`` output."""
    labels, loops = {}, []
    for index, (address, text) in enumerate(code):
        if address < 0:
            labels[text] = index
            continue
        target = re.search(r"BRA `\(\.(L_x_\d+)\)", text)
        if target and labels.get(target.group(1)) is not None:
            loops.append((labels[target.group(1)], index))
    return loops


def loop_bodies(code: list[tuple[int, str]], innermost: bool = True) -> list[list[tuple[int, str]]]:
    """The instructions of each loop in ``sass`` output; with ``innermost`` only of the loops
    that contain no other loop: the steady states (an outer loop's body also holds its inner
    loop's pipeline prologue and epilogue)."""
    loops = _loops(code)
    if innermost:
        loops = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    return [[entry for entry in code[start:end + 1] if entry[0] >= 0] for start, end in loops]


def longest_loop(code: list[tuple[int, str]], innermost: bool = False) -> list[tuple[int, str]]:
    """The instructions of the longest loop in ``sass`` output, or []; with ``innermost``, of
    the longest loop that contains no other loop."""
    return max(loop_bodies(code, innermost), key=len, default=[])


def loop_wgmma(compiled) -> list[tuple[int, int]]:
    """(wgmma instructions, waits for them) in each innermost loop with wgmma of a kernel
    compiled for sm_90 (the proxy forward has two: its fixed and running softmax shifts): as
    many waits as products means each product waits for the one before it, whether ptxas
    serialised them (C7515) or the compiler placed the waits."""
    counts = []
    for body in loop_bodies(sass(compiled)):
        products = sum(opcode(text) == "HGMMA" for _, text in body)
        if products:
            counts.append((products, sum("WARPGROUP.DEPBAR" in text for _, text in body)))
    return counts


def ptxas_usage(compiled) -> dict:
    """Registers per thread, spilled bytes (the stack) and whether wgmma is serialised, from
    ptxas -v."""
    info = ptxas_info(compiled)
    stack = re.search(r"(\d+) bytes cumulative stack size", info)
    return {"registers": int(re.search(r"Used (\d+) registers", info).group(1)),
            "spilled": int(stack.group(1)) if stack else 0, "serialised": "C7515" in info}


def mdta_stream_plans():
    """Yields (pass name, padded head width, pointer type, element size, plan, kernel, its
    constexprs, streams) for each streaming pass of the MDTA kernels (the Gram pass; the mix,
    single and dual) with its GPU plan at SIPL's padded widths 64, 128 and 256, bf16 and float32,
    prefetch depths 1 and 2 (a depth the registers do not allow gives the shallower plan, once).
    Needs TRITON_INTERPRET unset before the kernels are imported."""
    import itertools

    import triton.language as tl

    from sipl_fast.kernels import transposed_attention as kernels
    seen = set()
    for c_pad, (pointer, size, precision), depth in itertools.product(
            (64, 128, 256), (("*bf16", 2, "ieee"), ("*fp32", 4, "tf32x3")), (1, 2)):
        cases = [("gram", kernels._gram_partials_kernel, kernels._gram_plan(c_pad, size, precision, depth), {}, 2)]
        for streams in (1, 2):
            plan = kernels._mix_plan(c_pad, size, streams, precision, depth)
            if plan is not None:
                cases.append((f"mix{streams}", kernels._channel_mix_kernel, plan,
                              # (bf16 and float32 rows of M go unscaled, as _mix_plan plans them by default)
                              dict(DIAG=streams == 2, DUAL=streams == 2, SCALE_ROWS=False, BLOCK_K=c_pad), streams))
        for name, kernel, plan, flags, streams in cases:
            key = (name, c_pad, pointer, tuple(sorted(plan.items())))
            if key in seen:
                continue
            seen.add(key)
            constants = dict(flags, PRECISION=precision, ACC=tl.float32, BLOCK_N=plan["BLOCK_N"],
                             PREFETCH=plan["PREFETCH"], **{k: plan[k] for k in ("BLOCK_C", "BLOCK_I") if k in plan})
            yield name, c_pad, pointer, size, plan, kernel, constants, streams


def compile_mdta_plan(kernel, constants: dict, pointer: str, plan: dict):
    """An MDTA streaming kernel compiled for sm_90 with ``constants`` and ``plan``'s warps and
    stages, its streams typed ``pointer``, as Triton specialises a launch on maps whose planes
    hold a multiple of 16 pixels (512x512)."""
    small = ("m_ptr", "diag1_ptr", "diag2_ptr", "partials_ptr")  # the float32 c x c matrices
    aligned = [name for name in kernel.arg_names if name not in constants
               and (name.endswith("_ptr") or "stride" in name or name in ("N", "CHUNK", "PIXELS_PER_PROGRAM"))]
    return compile_sm90(kernel, constants, lambda name: "*fp32" if name in small else pointer,
                        plan["num_warps"], plan["num_stages"], aligned)


def run_compiled(test_file: str, timeout: int, args=()):
    """Runs ``test_file`` as a script with TRITON_INTERPRET=0 (its __main__ compiles its kernels
    for sm_90 and exits non-zero on a problem): the kernels must be imported with the
    interpreter off, which the test process has on. The finished process."""
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, test_file, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
