"""Images in: photos for figures, multi-crop augmentation, datasets."""
from dinolite.data.photos import PHOTO_NAMES, load_photo, sample_photos
