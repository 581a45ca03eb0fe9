"""The paper's prompt templates as data (ARD supplement C, tables 4 and 5).

``COCO_TEMPLATES`` is table 4 (used for every group when ``template_set="coco"``);
``LVIS_TEMPLATES`` is table 5 (10 groups x 10 templates). ``{}`` marks the concept,
filled with the personalised-concept phrase (``WorldConfig.placeholder``, e.g. ``"V* {}"``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

COCO_TEMPLATES: list[str] = [
    "A photo of {} standing in a forest.",
    "A photo of {} standing near the lake.",
    "A photo of {} standing on the beach.",
    "A photo of {} standing in a city street.",
    "A photo of {} standing on a mountain peak.",
    "An oil painting of {} standing on the beach.",
    "A watercolor illustration of {} standing on the beach.",
    "A charcoal sketch of {} standing on the beach.",
    "A digital painting of {} standing on the beach.",
    "A pencil drawing of {} standing on the beach.",
]

LVIS_TEMPLATES: dict[str, list[str]] = {
    "living_creatures": [
        "A {} is resting under the shade of a large tree.",
        "A {} is wandering through a dense forest.",
        "A {} is captured in a stunning wildlife photograph.",
        "A {} is lying on soft grass in a countryside setting.",
        "A {} is silhouetted against a golden sunset.",
        "An oil painting of a {} exploring a misty valley.",
        "A charcoal sketch of a {} sitting on a rock.",
        "An ink drawing of a {} in a traditional setting.",
        "A photorealistic rendering of a {} in a peaceful landscape.",
        "A vintage poster featuring a {} in a classic nature scene.",
    ],
    "wearables": [
        "A {} is hanging on a coat rack in a dimly lit hallway.",
        "A {} is displayed in a luxury boutique window.",
        "A {} is placed neatly on a wooden table in a tailor shop.",
        "A {} is resting on a chair beside a fireplace.",
        "A {} is folded inside a suitcase ready for travel.",
        "An oil painting of a {} on a vintage dresser.",
        "A charcoal sketch of a {} lying on a wooden table.",
        "An ink drawing of a {} in a 19th-century wardrobe.",
        "A photorealistic rendering of a {} in a stylish setting.",
        "A vintage poster featuring a {} in a retro fashion advertisement.",
    ],
    "furniture_decor": [
        "A {} is placed near a grand fireplace in a rustic home.",
        "A {} is positioned under a large crystal chandelier.",
        "A {} is standing alone in a vast empty hall.",
        "A {} is resting in the middle of a traditional Japanese tea room.",
        "A {} is located in a sunlit corner of a cozy reading room.",
        "An oil painting of a {} in a cozy library.",
        "A charcoal sketch of a {} in an antique furniture store.",
        "An ink drawing of a {} in a classical home interior.",
        "A photorealistic rendering of a {} in a modern home.",
        "A vintage poster featuring a {} in an old-style decor catalog.",
    ],
    "tools_objects": [
        "A {} is resting on a sturdy workbench.",
        "A {} is covered in rust and age marks.",
        "A {} is lying on a construction site floor.",
        "A {} is positioned on an artisan crafting table.",
        "A {} is stored inside a wooden toolbox.",
        "An oil painting of a {} in an old tool shed.",
        "A charcoal sketch of a {} in a mechanic workspace.",
        "An ink drawing of a {} in a vintage repair shop.",
        "A photorealistic rendering of a {} in industrial lighting.",
        "A vintage poster featuring a {} in a historical craftsmanship ad.",
    ],
    "transportation": [
        "A {} is parked near a quiet countryside road.",
        "A {} is cruising along a scenic coastal highway.",
        "A {} is covered in morning dew on a foggy street.",
        "A {} is silhouetted against a sunrise on a mountain road.",
        "A {} is parked beside a train station with steam rising.",
        "An oil painting of a {} in a bustling city street.",
        "A charcoal sketch of a {} driving through a foggy night.",
        "An ink drawing of a {} in a historical cityscape.",
        "A photorealistic rendering of a {} speeding on a freeway.",
        "A vintage poster featuring a {} in a retro advertisement.",
    ],
    "tech_electronics": [
        "A {} is placed on a marble table in a futuristic lab.",
        "A {} is covered in dust inside an old electronics shop.",
        "A {} is sitting on a work desk cluttered with notes.",
        "A {} is resting on a wooden shelf beside books.",
        "A {} is stored safely inside a padded carrying case.",
        "An oil painting of a {} surrounded by mechanical parts.",
        "A charcoal sketch of a {} with classic detailing.",
        "An ink drawing of a {} in a cyberpunk environment.",
        "A photorealistic rendering of a {} with neon reflections.",
        "A vintage poster featuring a {} in a retro advertisement.",
    ],
    "food_drink": [
        "A {} is placed on a rustic wooden cutting board.",
        "A {} is sitting next to a steaming cup of herbal tea.",
        "A {} is served on a silver plate in an elegant setting.",
        "A {} is resting in a woven basket at a farmers' market.",
        "A {} is stacked in a classic still-life arrangement.",
        "An oil painting of a {} with soft pastel colors.",
        "A charcoal sketch of a {} in a rustic kitchen.",
        "An ink drawing of a {} on a decorative plate.",
        "A photorealistic rendering of a {} with fresh ingredients.",
        "A vintage poster featuring a {} in a food advertisement.",
    ],
    "outdoor_nature": [
        "A {} is standing tall against a misty mountain backdrop.",
        "A {} is partially covered in snow during winter.",
        "A {} is growing near a quiet lake under the sun.",
        "A {} is surrounded by lush greenery in a rainforest.",
        "A {} is positioned along a rocky path in a canyon.",
        "An oil painting of a {} under a golden sunset.",
        "A charcoal sketch of a {} in a serene landscape.",
        "An ink drawing of a {} in a botanical illustration.",
        "A photorealistic rendering of a {} in a vibrant ecosystem.",
        "A vintage poster featuring a {} as part of a travel campaign.",
    ],
    "sports_play": [
        "A {} is resting on a freshly cut grassy field.",
        "A {} is placed next to a pair of running shoes.",
        "A {} is stored in a well-used gym bag.",
        "A {} is surrounded by cheering crowds in a stadium.",
        "A {} is hanging from a rack in a sports store.",
        "An oil painting of a {} in dynamic motion.",
        "A charcoal sketch of a {} in a championship match.",
        "An ink drawing of a {} in a dramatic action pose.",
        "A photorealistic rendering of a {} in a high-energy game.",
        "A vintage poster featuring a {} promoting a sports event.",
    ],
    "misc_objects": [
        "A {} is lying on an antique wooden desk.",
        "A {} is placed on a bookshelf among dusty volumes.",
        "A {} is glowing softly under warm candlelight.",
        "A {} is stored carefully in an elegant glass case.",
        "A {} is positioned near a rain-covered window.",
        "An oil painting of a {} in a cozy reading nook.",
        "A charcoal sketch of a {} on an artist table.",
        "An ink drawing of a {} in a historical archive.",
        "A photorealistic rendering of a {} in a soft-lit room.",
        "A vintage poster featuring a {} in an old advertisement.",
    ],
}

GROUPS: tuple[str, ...] = tuple(LVIS_TEMPLATES)

# Medium words, longest/most specific first ("photorealistic rendering" before "photo").
MEDIA: tuple[str, ...] = (
    "photorealistic rendering",
    "watercolor illustration",
    "charcoal sketch",
    "digital painting",
    "pencil drawing",
    "oil painting",
    "ink drawing",
    "vintage poster",
)
PHOTO = "photo"
ALL_MEDIA: tuple[str, ...] = (PHOTO,) + MEDIA

# Scenes the world can draw; the context words of a template choose one.
SCENES: tuple[str, ...] = (
    "forest", "lake", "beach", "street", "mountain", "field", "sunset", "snow",
    "night", "room", "table", "lab", "stadium", "sky",
)

SCENE_KEYWORDS: dict[str, tuple[str, ...]] = {
    "sunset": ("sunset", "sunrise", "golden"),
    "snow": ("snow", "winter"),
    "night": ("night", "candlelight", "dark"),
    "lake": ("lake", "river", "rain-covered", "pond"),
    "beach": ("beach", "coastal", "sea", "ocean"),
    "mountain": ("mountain", "canyon", "rocky", "rock", "peak"),
    "forest": ("forest", "tree", "rainforest", "greenery", "jungle", "woods"),
    "street": ("street", "city", "cityscape", "road", "highway", "freeway", "station", "construction site"),
    "stadium": ("stadium", "championship", "game", "match", "sports event", "crowds"),
    "lab": ("lab", "futuristic", "cyberpunk", "neon", "industrial", "electronics shop", "mechanical"),
    "table": (
        "table", "desk", "workbench", "cutting board", "plate", "basket", "shelf", "bookshelf", "kitchen",
        "toolbox", "case", "suitcase", "bag", "ingredients", "still-life", "tea", "notes", "workspace",
        "tool shed", "repair shop", "market",
    ),
    "room": (
        "room", "hall", "hallway", "home", "library", "fireplace", "chandelier", "interior", "wardrobe",
        "dresser", "boutique", "store", "shop", "nook", "window", "archive", "catalog", "setting", "rack",
        "advertisement",
    ),
    "field": (
        "grass", "grassy", "field", "countryside", "landscape", "nature", "valley", "ecosystem", "meadow",
        "wildlife", "botanical",
    ),
    "sky": ("sky", "travel", "sun"),
}

GROUP_FALLBACK_SCENE: dict[str, str] = {
    "living_creatures": "field",
    "wearables": "room",
    "furniture_decor": "room",
    "tools_objects": "table",
    "transportation": "street",
    "tech_electronics": "table",
    "food_drink": "table",
    "outdoor_nature": "field",
    "sports_play": "stadium",
    "misc_objects": "room",
}


@dataclass(frozen=True)
class Template:
    """A prompt template with what the world reads from it."""

    text: str
    group: str
    medium: str
    scene: str


def _medium(text: str) -> str:
    low = text.lower()
    for m in MEDIA:
        if m in low:
            return m
    return PHOTO


def _scene(text: str, group: str) -> str:
    low = text.lower().replace("{}", " ")
    best: tuple[int, int, str] | None = None  # (position, -keyword length, scene)
    for scene, words in SCENE_KEYWORDS.items():
        for w in words:
            m = re.search(r"\b" + re.escape(w) + r"\b", low)
            if m:
                key = (m.start(), -len(w), scene)
                if best is None or key < best:
                    best = key
    if best is not None:
        return best[2]
    return GROUP_FALLBACK_SCENE.get(group, "room")


def parse_template(text: str, group: str) -> Template:
    """Read the medium (``"photo"`` when none is named) and the scene from a template."""
    if text.count("{}") != 1:
        raise ValueError(f"template {text!r} must hold exactly one '{{}}'")
    return Template(text=text, group=group, medium=_medium(text), scene=_scene(text, group))


def templates_for(group: str, template_set: Literal["lvis", "coco"] = "lvis") -> list[Template]:
    """The templates a concept of ``group`` is generated from."""
    if group not in LVIS_TEMPLATES:
        raise KeyError(f"unknown template group {group!r}; known: {list(LVIS_TEMPLATES)}")
    if template_set == "coco":
        texts = COCO_TEMPLATES
    elif template_set == "lvis":
        texts = LVIS_TEMPLATES[group]
    else:
        raise ValueError(f"template_set={template_set!r} must be 'lvis' or 'coco'")
    return [parse_template(t, group) for t in texts]


def fill(template_text: str, base_class: str, placeholder: str = "V* {}") -> tuple[str, str]:
    """Return ``(prompt, concept_phrase)``: the template with the personalised phrase filled in."""
    if placeholder.count("{}") != 1:
        raise ValueError(f"placeholder={placeholder!r} must hold exactly one '{{}}'")
    if template_text.count("{}") != 1:
        raise ValueError(f"template {template_text!r} must hold exactly one '{{}}'")
    phrase = concept_phrase(placeholder, base_class)
    return template_text.replace("{}", phrase), phrase


def concept_phrase(placeholder: str, base_class: str) -> str:
    """The personalised phrase of ``base_class``: ``placeholder`` with its ``{}`` replaced (any other brace is text)."""
    return placeholder.replace("{}", base_class.replace("_", " "))
