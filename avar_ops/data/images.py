"""The image-size rule Qwen2.5-VL's image processor imposes, shared by the sample and record readers."""

__all__ = ["MAX_ASPECT_RATIO", "check_image_size"]

MAX_ASPECT_RATIO = 200.0


def check_image_size(size, what: str) -> None:
    """ValueError "WHAT is W×H pixels; …" for an image Qwen2.5-VL's image processor cannot take (an empty side, or
    an aspect ratio beyond `MAX_ASPECT_RATIO`): the one check `avar vas` and the training records share."""
    w, h = size
    if min(w, h) < 1 or max(w, h) / min(w, h) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"{what} is {w}×{h} pixels; Qwen2.5-VL's image processor takes aspect ratios up to {MAX_ASPECT_RATIO:g}:1"
        )
