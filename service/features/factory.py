"""Pick the featurizer a stream needs from its input kind, the model card and the settings."""

from __future__ import annotations

from service.config import Settings
from service.contract.features import DEFAULT_SPEC
from service.contract.model_card import ModelCard
from service.features.base import Featurizer, UnsupportedInput

IMAGE_KINDS = ("jpeg", "png")
INPUT_KINDS = (*IMAGE_KINDS, "keypoints", "features")


def create_featurizer(kind: str, card: ModelCard, settings: Settings, *, clip_batcher=None,
                      record_keypoints: bool = False) -> Featurizer:
    """A fresh per-stream featurizer for ``kind`` ("jpeg", "png", "keypoints" or "features").

    - model trained on the built-in keypoint features: images go through MediaPipe Holistic,
      keypoint frames through the built-in transform, feature steps pass through;
    - model trained on backbone features (``input_kind == "features"``): feature steps pass
      through, images need a clip backbone (``clip_batcher``, shared across streams, see
      :func:`service.features.clip.create_clip_batcher`), keypoints are refused.
    Raises UnsupportedInput with the reason when the combination cannot work.
    """
    spec = card.feature
    if kind not in INPUT_KINDS:
        raise UnsupportedInput(f"unknown input kind {kind!r}; expected one of {', '.join(INPUT_KINDS)}")
    if kind == "features":
        from service.features.passthrough import FeaturePassthrough

        return FeaturePassthrough(spec.feature_dim)

    if spec.input_kind == "keypoints":
        if not spec.is_builtin():
            raise UnsupportedInput(
                f"model {card.name} expects {spec.name} v{spec.version} features, which this server "
                f"cannot compute (it computes {DEFAULT_SPEC.name} v{DEFAULT_SPEC.version}); "
                "send feature steps instead"
            )
        if kind == "keypoints":
            from service.features.passthrough import KeypointPassthrough

            return KeypointPassthrough(spec)
        from service.features.pose import PoseFeaturizer

        return PoseFeaturizer(
            input_format=kind,
            spec=spec,
            complexity=settings.pose_model_complexity,
            every_n=settings.pose_every_n,
            max_pixels=settings.max_image_pixels,
            record_keypoints=record_keypoints,
        )

    if spec.input_kind == "features":
        if kind == "keypoints":
            raise UnsupportedInput(
                f"model {card.name} was trained on {spec.feature_dim}-dim backbone features ({spec.name}); "
                "it cannot take keypoints. Send images (with a clip backbone configured) or feature steps"
            )
        if clip_batcher is None:
            raise UnsupportedInput(
                f"model {card.name} was trained on {spec.feature_dim}-dim backbone features ({spec.name}) "
                "and no clip backbone is configured (MGSTREAM_CLIP_BACKBONE_PATH); send feature steps "
                "instead of images"
            )
        from service.features.clip import ClipFeaturizer

        return ClipFeaturizer(clip_batcher, input_format=kind, max_pixels=settings.max_image_pixels,
                              frames_per_step=spec.frames_per_step, feature_dim=spec.feature_dim)

    raise UnsupportedInput(f"model {card.name} has an unknown feature input_kind {spec.input_kind!r}")
