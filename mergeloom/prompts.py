"""Class names the dataset files do not carry, and prompt templates for every benchmark dataset.

Templates are short lists in the spirit of CLIP's per-dataset prompts (written for this project):
each is a format string with one ``{}`` for the class name. Class names come from the dataset
object wherever torchvision provides them (CIFAR-100 keeps its underscores, algorithms.md §7
trap 24); the lists here cover the datasets whose files hold only label indices, and readable
names for datasets whose classes are folder identifiers (EuroSAT).
"""

from __future__ import annotations

DIGITS = tuple(str(d) for d in range(10))

# GTSRB label index -> sign meaning (the 43 classes of the German Traffic Sign Benchmark).
GTSRB = (
    "speed limit 20 km/h", "speed limit 30 km/h", "speed limit 50 km/h", "speed limit 60 km/h",
    "speed limit 70 km/h", "speed limit 80 km/h", "end of speed limit 80 km/h",
    "speed limit 100 km/h", "speed limit 120 km/h", "no overtaking",
    "no overtaking by trucks", "right of way at the next crossroads", "priority road",
    "give way", "stop", "no vehicles", "no trucks", "no entry", "general danger",
    "dangerous bend to the left", "dangerous bend to the right", "double bend", "uneven road",
    "slippery road", "road narrows on the right", "roadworks", "traffic lights",
    "pedestrian crossing", "children crossing", "cyclists crossing", "ice or snow",
    "wild animals crossing", "end of all restrictions", "turn right ahead", "turn left ahead",
    "ahead only", "ahead or turn right", "ahead or turn left", "keep right", "keep left",
    "roundabout", "end of no overtaking", "end of no overtaking by trucks",
)  # fmt: skip

# Oxford Flowers-102 label index -> flower name.
FLOWERS102 = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
    "english marigold", "tiger lily", "moon orchid", "bird of paradise", "monkshood",
    "globe thistle", "snapdragon", "colt's foot", "king protea", "spear thistle", "yellow iris",
    "globe flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke",
    "sweet william", "carnation", "garden phlox", "love in the mist", "mexican aster",
    "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort", "siam tulip",
    "lenten rose", "barberton daisy", "daffodil", "sword lily", "poinsettia", "bolero deep blue",
    "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura",
    "geranium", "orange dahlia", "pink and yellow dahlia", "cautleya spicata",
    "japanese anemone", "black-eyed susan", "silverbush", "californian poppy", "osteospermum",
    "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania", "azalea",
    "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert rose", "tree mallow",
    "magnolia", "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "air plant",
    "foxglove", "bougainvillea", "camellia", "mallow", "mexican petunia", "bromelia",
    "blanket flower", "trumpet creeper", "blackberry lily",
)  # fmt: skip

# FER2013 label index (0 angry ... 6 neutral) -> expression.
FER2013 = ("angry", "disgusted", "fearful", "happy", "sad", "surprised", "neutral")
PCAM = ("lymph node", "lymph node with metastatic tumour tissue")

# EuroSAT folder name -> readable land-cover name.
EUROSAT = {
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "herbaceous vegetation",
    "Highway": "highway or road",
    "Industrial": "industrial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings",
    "River": "river",
    "SeaLake": "sea or lake",
}

_OBJECT = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a low-resolution photo of a {}.",
)
_DIGIT = ('a photo of the number "{}".', "an image of the digit {}.")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "Cars": ("a photo of a {}, a type of car.", "a photo of my {}.", "a {} parked outside.",
             "a photo of the {}, a car.", "a close-up photo of a {} car."),
    "DTD": ("a photo of a {} texture.", "a photo of a {} surface.", "a close-up of a {} pattern.",
            "a {} textured material."),
    "EuroSAT": ("a satellite photo of {}.", "a centered satellite image of {}.",
                "an aerial view of {}."),
    "GTSRB": ('a traffic sign meaning "{}".', 'a photo of a "{}" road sign.',
              'a zoomed-in photo of a "{}" traffic sign.'),
    "MNIST": _DIGIT,
    "RESISC45": ("a satellite photo of a {}.", "aerial imagery of a {}.",
                 "a remote sensing image of the {}."),
    "SUN397": ("a photo of a {}.", "a photo of the {}, a type of place.", "a scene showing a {}."),
    "SVHN": ('a photo of the house number "{}".', "a street number {} on a wall."),
    "CIFAR10": _OBJECT,
    "CIFAR100": _OBJECT,
    "STL10": ("a photo of a {}.", "a photo of the {}.", "a cropped photo of a {}."),
    "Flowers102": ("a photo of a {}, a type of flower.", "a close-up of a {} in bloom."),
    "OxfordIIITPet": ("a photo of a {}, a type of pet.", "a photo of my {}."),
    "PCAM": ("a histopathology slide of {}.", "a microscope image showing {}."),
    "FER2013": ("a photo of a {} face.", "a person looking {}.", "a face with a {} expression."),
    "Food101": ("a photo of {}, a type of food.", "a plate of {}."),
    "FashionMNIST": ("a photo of a {}.", "a grayscale picture of a {}, an item of clothing."),
    "RenderedSST2": ("a {} review of a movie.", "a sentence with a {} sentiment."),
    "EMNIST": _DIGIT,
    "KMNIST": ('a handwritten hiragana character "{}".', 'the kuzushiji character "{}".'),
    "domains": ("a photo of a {}.", "an image of a {}.", "a picture of the {}."),
}  # fmt: skip
