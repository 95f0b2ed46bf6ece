"""fastclip's Triton kernels (``clip``): readable, vendorable, independent of fastclip's public API."""
