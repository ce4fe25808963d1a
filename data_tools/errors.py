"""Why a source row did not become a sample.

Every skipped row goes to `rejected.jsonl` with a short `code` (counted in the build summary) and a
message that names the row and the cause.
"""

from __future__ import annotations

from mmtrain.data.schema import SampleError

# The codes a build can report, with what each means (shown by `mmtrain data build --help`).
REJECT_CODES = {
    "missing_media": "a media path that does not exist (or is not a regular file)",
    "corrupt_image": "an image that does not decode (corrupt or truncated)",
    "corrupt_audio": "an audio file that does not decode (corrupt or truncated)",
    "image_too_large": "an image whose header declares more than --max-image-pixels (bomb)",
    "unsupported_format": "images not JPEG/PNG/WebP/GIF, audio not WAV/FLAC/MP3/Ogg/Opus (or "
                          "a format this libsndfile cannot decode), a tar member that is not "
                          "media/txt/json, or a URL without --download",
    "empty_text": "no text, or only whitespace",
    "text_too_long": "more text characters than --max-text-chars",
    "unsafe_name": "a key or member name that is absolute or has a '..', empty or '.'-leading "
                   "part, a backslash or NUL; a key with '.' in its base name or over 80 bytes",
    "unsafe_path": "a media path that leaves --media-root",
    "duplicate_key": "a key already used by an earlier sample of this build",
    "bad_row": "a row that does not have the expected columns or types; a CSV row whose field "
               "count is wrong",
    "download_failed": "a media URL that could not be fetched (--download): HTTP error, "
                       "timeout after the retries, or larger than --download-max-bytes",
    "invalid_sample": "a sample the loader's schema refuses",
    "filtered": "dropped by a filter option (--min-text-chars, --min-image-side)",
    "bad_source": "an input file that cannot be read on (corrupt table, unclosed CSV quote, "
                  "truncated tar, failed pipe:); the rest of that file is skipped",
}


class Rejected(SampleError):
    """A row that is skipped: `code` is one of REJECT_CODES, the message says why."""

    def __init__(self, code: str, message: str) -> None:
        assert code in REJECT_CODES, code
        super().__init__(message)
        self.code = code
