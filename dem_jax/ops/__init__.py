"""The CPU kernels: convolution, pooling and BatchNorm in pure-XLA forms and as XLA FFI custom calls.

`conv` chooses an implementation per layer (`conv_impl`), holds the max-pool, and at inference folds BatchNorm into
the convolution before it; `norm` is BatchNorm (and the ReLU after it) with the gradient written out; `onednn` builds,
checks and loads the native library (`native/onednn_conv.cc`: oneDNN's convolutions, and plain loops for
max-pooling and per-channel sums) and wraps its handlers in differentiable functions.
"""
