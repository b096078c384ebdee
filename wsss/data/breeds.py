"""The fixed list of the 37 Oxford-IIIT Pet breeds (official class ids 1..37) and label spaces.

torchvision's ``OxfordIIITPet.classes`` is built from the breeds present in a split file, so on a subset
it is shorter than 37 and names the wrong breed; this list never changes.
"""

from __future__ import annotations

BREEDS: tuple[str, ...] = (
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "Bengal",
    "Birman", "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau", "english_cocker_spaniel",
    "english_setter", "german_shorthaired", "great_pyrenees", "havanese", "japanese_chin", "keeshond",
    "leonberger", "Maine_Coon", "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug",
    "Ragdoll", "Russian_Blue", "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "Siamese",
    "Sphynx", "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier",
)
SPECIES: tuple[str, ...] = ("cat", "dog")
# Oxford convention: capitalised breed names are cats (split files: SPECIES 1 = cat, 2 = dog).
BREED_SPECIES: tuple[int, ...] = tuple(0 if b[0].isupper() else 1 for b in BREEDS)
NUM_BREEDS = len(BREEDS)
BACKGROUND = "background"


def num_classes(labels: str, bg: bool) -> int:
    """Size of a label space: species 2 (+bg 3), breed 37 (+bg 38)."""
    if labels not in ("species", "breed"):
        raise ValueError(f"labels must be 'species' or 'breed', got {labels!r}")
    base = len(SPECIES) if labels == "species" else NUM_BREEDS
    return base + int(bg)


def class_names(labels: str, bg: bool) -> list[str]:
    """Names of the classes of a label space, background last."""
    names = list(SPECIES) if labels == "species" else list(BREEDS)
    return names + [BACKGROUND] if bg else names


def variant_name(labels: str, bg: bool) -> str:
    """Classifier variant name, e.g. ``species``, ``breed-bg``."""
    return f"{labels}-bg" if bg else labels
