"""Former home of the oneDNN convolution bindings (now `dem_jax.ops.onednn`): names kept for existing imports.

    python -m dem_jax.onednn   # the same as python -m dem_jax.ops.onednn
"""

from dem_jax.ops.onednn import OnednnUnavailable
from dem_jax.ops.onednn import available
from dem_jax.ops.onednn import bf16_available
from dem_jax.ops.onednn import bf16_unavailable_reason
from dem_jax.ops.onednn import build
from dem_jax.ops.onednn import conv2d_onednn
from dem_jax.ops.onednn import load
from dem_jax.ops.onednn import main
from dem_jax.ops.onednn import unavailable_reason
from dem_jax.ops.onednn import untrusted_reason

if __name__ == '__main__':
  main()
