"""Former home of the CPU convolutions and the malloc settings: names kept for existing imports.

The kernels live in `dem_jax.ops.conv`, the malloc settings in `dem_jax.process`.
"""

from dem_jax.ops.conv import CONV_IMPLS
from dem_jax.ops.conv import SMALL_MAP_POSITIONS
from dem_jax.ops.conv import conv2d
from dem_jax.ops.conv import conv2d_im2col
from dem_jax.ops.conv import conv2d_onednn_any_dtype
from dem_jax.ops.conv import conv2d_xla
from dem_jax.ops.conv import conv2d_xla_cpu
from dem_jax.ops.conv import max_pool
from dem_jax.ops.conv import max_pool_slices
from dem_jax.ops.conv import onednn_available
from dem_jax.ops.conv import onednn_bf16_available
from dem_jax.ops.conv import resolve_conv_impl
from dem_jax.process import accelerator_plugin_installed
from dem_jax.process import retain_freed_memory
from dem_jax.process import retain_freed_memory_on_cpu
