"""Dataset readers; importing this package registers them all."""

from fortify.data.readers import (  # noqa: F401
    caltech,
    cifar,
    digits,
    image_folder,
    mnist,
    svhn,
    tiny_imagenet,
)
