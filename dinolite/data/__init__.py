"""Images in: photos for figures, multi-crop augmentation, datasets."""
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
    DATA_SPEC_FORMS,
    IMAGE_EXTENSIONS,
    SHAPE_CLASSES,
    TEXTURE_CLASSES,
    DataError,
    DataNotFoundError,
    ImageFolderDataset,
    ImageListDataset,
    SyntheticShapes,
    SyntheticTextures,
    TextureMosaics,
    TorchvisionDataset,
    build_dataset,
    cifar10,
    imagenette,
    make_loader,
    stl10,
)
from dinolite.data.photos import PHOTO_NAMES, load_photo, sample_photos
