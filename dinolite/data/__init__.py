"""Images in: photos for figures, multi-crop augmentation, datasets on disk, generated datasets, the --data spec."""
from dinolite.data.augment import (
    BLUR_PROBABILITIES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PRESETS,
    EvalTransform,
    MultiCropAugmentation,
    denormalize,
    normalize,
    random_resized_crop_box,
    to_float_tensor,
    to_rgb,
)
from dinolite.data.datasets import (
    IMAGE_EXTENSIONS,
    BadImagesError,
    DataError,
    DataNotFoundError,
    ImageFolderDataset,
    ImageListDataset,
    TorchvisionDataset,
    cifar10,
    imagenette,
    stl10,
)
from dinolite.data.photos import PHOTO_NAMES, PhotoMosaics, load_photo, sample_photos
from dinolite.data.spec import DATA_SPEC_FORMS, build_dataset
from dinolite.data.synthetic import SHAPE_CLASSES, TEXTURE_CLASSES, SyntheticShapes, SyntheticTextures, TextureMosaics
