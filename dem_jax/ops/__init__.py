"""The CPU convolution and pooling kernels: pure-XLA forms and oneDNN's through XLA FFI custom calls.

`conv` chooses an implementation per layer (`conv_impl`) and holds the max-pool; `onednn` builds, checks and loads
the native library (`native/onednn_conv.cc`) and wraps its handlers in a differentiable `conv2d_onednn`.
"""
