"""Media tokenizers: images and audio ↔ discrete codes, for generating media (issue 15).

Small convolutional autoencoders with a finite scalar quantizer (`vector_quantize_pytorch.FSQ`),
trained by the project (`mmtrain data train-media-tokenizer`), saved as versioned, fingerprinted
directories (files.py). See docs/architecture.md, "Media tokenizers".
"""

from mmtrain.media_tokenizers.audio import (AudioTokenizer, AudioTokenizerConfig, GriffinLimVocoder,
                                            Vocoder)
from mmtrain.data.schema import CODES_SUFFIX
from mmtrain.media_tokenizers.files import (FORMAT_VERSION, MediaTokenizer,
                                            build_tokenizer, codes_from_npy, codes_to_npy,
                                            load_tokenizer, read_tokenizer_info, save_tokenizer,
                                            tokenizer_fingerprint)
from mmtrain.media_tokenizers.image import ImageTokenizer, ImageTokenizerConfig
from mmtrain.media_tokenizers.train import FitConfig, evaluate, fit

__all__ = ["AudioTokenizer", "AudioTokenizerConfig", "CODES_SUFFIX", "FORMAT_VERSION",
           "FitConfig", "GriffinLimVocoder", "ImageTokenizer", "ImageTokenizerConfig",
           "MediaTokenizer", "Vocoder", "build_tokenizer", "codes_from_npy", "codes_to_npy",
           "evaluate", "fit", "load_tokenizer", "read_tokenizer_info", "save_tokenizer",
           "tokenizer_fingerprint"]
