"""SMG's 17 micro-gesture classes, with the 1-based ids used by the SMG annotation files."""

from __future__ import annotations

SMG_CLASSES: tuple[str, ...] = (
    "Turtling neck and shoulder",
    "Rubbing eyes and forehead",
    "Folding arms",
    "Touching or covering suprasternal notch",
    "Moving legs",
    "Touching or scratching neck",
    "Folding arms behind body",
    "Rubbing hands and crossing fingers",
    "Arms akimbo",
    "Crossing legs",
    "Scratching some part of body",
    "Scratching or touching facial parts other than eyes",
    "Playing or adjusting hair",
    "Holding arms",
    "Pulling shirt collar",
    "Playing with jewelry or manipulating objects",
    "Illustrative hand gestures (non-MG)",
)
NUM_CLASSES = len(SMG_CLASSES)
NON_MG_CLASS_ID = 17


def label_of(class_id: int, classes: tuple[str, ...] = SMG_CLASSES) -> str:
    """Label of a 1-based class id; raises ValueError naming the valid range."""
    if not 1 <= class_id <= len(classes):
        raise ValueError(f"class id {class_id} out of range 1..{len(classes)}")
    return classes[class_id - 1]
