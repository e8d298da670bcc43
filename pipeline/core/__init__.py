# Registers the HEIC/HEIF opener with Pillow (pipeline.core.image_formats) in every process that imports GeoPak's
# core, so whatever opens an image through GeoPak's code reads iPhone photos the same way.
from pipeline.core import image_formats as _image_formats  # noqa: F401
