"""Triton kernels of sipl_fast, installed as ``sipl_fast.kernels``.

One file per op; each holds its kernels, launch functions and launch plans:
- ``proxy_attention``: the Proxy Fusion spatial cosine cross-attention (forward, backward).
- ``transposed_attention``: Restormer's MDTA channel attention (forward, backward).
- ``layer_norm2d``: per-pixel LayerNorm over channels of NCHW maps (forward, backward).
- ``gated_gelu``: the feed-forward gates gelu(a)*b and gelu(b)*a + gelu(a)*b (forward, backward).
- ``depthwise3x3``: the depthwise 3x3 convolution of the projections (forward, input and
  weight gradients).
- ``depthwise3x3_gate``: that convolution and the gate in one pass (inference forward).
- ``common``: what they share (the interpreter flag, the arithmetic dtype, the multiprocessor
  count, F.normalize's eps).
Autograd Functions and custom ops wrapping them live in ``sipl_fast.ops``; docs/design.md
describes each kernel and the measurements behind its parameters.
"""
