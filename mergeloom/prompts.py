"""Class names the dataset files do not carry, and prompt templates for every benchmark dataset.

Templates are the Task Arithmetic protocol's per-dataset lists (OpenAI CLIP's prompt engineering,
extended by the TALL-masks benchmark to 20 datasets), read from the pinned ``fusion-bench``
package, which ships them as one small module per dataset under
``fusion_bench/tasks/clip_classification/`` (docs/methods.md#multitask). Each list is turned into
format strings with one ``{}`` for the class name. Only the ``domains`` entry (this project's
leave-one-domain-out tasks, no benchmark list exists) is written for this project.

``fusion-bench`` is installed with ``--no-deps``: its package ``__init__`` imports Lightning,
Hydra, transformers and HF datasets, so the template files are located through the installed
distribution's file list and executed on their own, without importing the package.

Class names come from the dataset object wherever torchvision provides them (CIFAR-100 keeps its
underscores, docs/methods.md#class-names); the lists here cover the datasets whose files hold only
label indices, and readable names for datasets whose classes are folder identifiers (EuroSAT).
"""

from __future__ import annotations

from importlib import metadata, util
from pathlib import Path

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

# Dataset name (mergeloom.datasets.SOURCES) -> template module under TEMPLATE_DIR.
FUSION_BENCH_MODULES: dict[str, str] = {
    "Cars": "stanford_cars",
    "DTD": "dtd",
    "EuroSAT": "eurosat",
    "GTSRB": "gtsrb",
    "MNIST": "mnist",
    "RESISC45": "resisc45",
    "SUN397": "sun397",
    "SVHN": "svhn",
    "CIFAR10": "cifar10",
    "CIFAR100": "cifar100",
    "STL10": "stl10",
    "Flowers102": "flower102",
    "OxfordIIITPet": "oxford_iiit_pet",
    "PCAM": "pcam",
    "FER2013": "fer2013",
    "Food101": "food101",
    "FashionMNIST": "fashion_mnist",
    "RenderedSST2": "rendered_sst2",
    "EMNIST": "emnist_mnist",
    "KMNIST": "kmnist",
}
TEMPLATE_PACKAGE = "fusion-bench"
TEMPLATE_DIR = "fusion_bench/tasks/clip_classification"


def benchmark_templates(module: str) -> tuple[str, ...]:
    """The ``templates`` list of one fusion-bench template module, as ``{}`` format strings.

    The module file is executed on its own (it only defines lists), so none of fusion-bench's
    dependencies are needed. Each template is a callable ``c -> str``; rendering it with ``"{}"``
    gives the format string, checked to hold that one placeholder and no other brace.

    Raises:
        ImportError: fusion-bench is not installed or lacks the module.
        ValueError: A template does not render to a format string with exactly one ``{}``.
    """
    try:
        dist = metadata.distribution(TEMPLATE_PACKAGE)
    except metadata.PackageNotFoundError as err:
        raise ImportError(
            f"the zero-shot templates come from {TEMPLATE_PACKAGE!r}; install the version pinned "
            f"in requirements.lock with `pip install --no-deps {TEMPLATE_PACKAGE}==<pin>`"
        ) from err
    path = Path(str(dist.locate_file(f"{TEMPLATE_DIR}/{module}.py")))
    if not path.is_file():
        raise ImportError(f"{TEMPLATE_PACKAGE} {dist.version} has no template module {path}")
    spec = util.spec_from_file_location(f"_mergeloom_templates_{module}", path)
    assert spec is not None and spec.loader is not None
    namespace = util.module_from_spec(spec)
    spec.loader.exec_module(namespace)
    out = tuple(t("{}") if callable(t) else str(t) for t in namespace.templates)
    bad = [t for t in out if t.count("{}") != 1 or t.count("{") != 1 or t.count("}") != 1]
    if not out or bad:
        raise ValueError(f"{path}: templates must render to one '{{}}' each, got {bad or out}")
    return out


TEMPLATES: dict[str, tuple[str, ...]] = {
    name: benchmark_templates(module) for name, module in FUSION_BENCH_MODULES.items()
}
# Project-written (no benchmark list): the leave-one-domain-out tasks of mergeloom.datasets.
TEMPLATES["domains"] = ("a photo of a {}.", "an image of a {}.", "a picture of the {}.")
