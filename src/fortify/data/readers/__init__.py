"""Dataset readers; importing this package registers them all."""

from fortify.data.readers import digits  # noqa: F401
