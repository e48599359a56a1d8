"""Input data for every entry point: evaluation samples (`avar vas/generate/sweep`), training records (SFT,
VARD, GRPO), image loading, the one text check (chat-template markers, length), path sanitising and the run-folder
policy (locks, resume/overwrite, whole checkpoints).
Images need pillow (the `analysis` extra)."""

from avar_ops.data.formats import FORMATS, IMAGE_PLACEHOLDER, detect_format, file_format
from avar_ops.data.paths import inside, safe_name, unique_safe_names
from avar_ops.data.records import (
    USES,
    LoadedRecords,
    Record,
    RecordError,
    append_rejects,
    load_records,
    parse_record,
)
from avar_ops.data.run_folder import (
    CHECKPOINT_MARKER,
    LOCK_FILE,
    RUN_FILE,
    RunFolder,
    RunFolderError,
    RunLock,
    finish_checkpoint,
    latest_checkpoint,
    open_run_folder,
    staging_folder,
    truncate_log,
)
from avar_ops.data.samples import (
    MAX_ASPECT_RATIO,
    build_inputs,
    chat_messages,
    check_image_size,
    check_images,
    check_unique_ids,
    load_images,
    load_samples,
    normalize_sample,
    sample_from_record,
)
from avar_ops.data.text import MAX_TEXT_CHARS, TEMPLATE_MARKER, TextError, check_text

__all__ = [
    "append_rejects",
    "FORMATS",
    "IMAGE_PLACEHOLDER",
    "CHECKPOINT_MARKER",
    "LOCK_FILE",
    "RUN_FILE",
    "RunFolder",
    "RunFolderError",
    "RunLock",
    "finish_checkpoint",
    "latest_checkpoint",
    "open_run_folder",
    "staging_folder",
    "truncate_log",
    "MAX_ASPECT_RATIO",
    "MAX_TEXT_CHARS",
    "TEMPLATE_MARKER",
    "USES",
    "LoadedRecords",
    "Record",
    "RecordError",
    "TextError",
    "build_inputs",
    "chat_messages",
    "check_image_size",
    "check_images",
    "check_text",
    "check_unique_ids",
    "detect_format",
    "file_format",
    "inside",
    "load_images",
    "load_records",
    "load_samples",
    "normalize_sample",
    "parse_record",
    "safe_name",
    "sample_from_record",
    "unique_safe_names",
]
