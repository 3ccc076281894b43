"""Tiny offline tokenizers for the data tests: byte-level BPE trained in memory (lossless on any
text, so decoded label spans can be compared with strings), no download."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "<pad>"]

_CORPUS = [
    "Question: Where was Ada Lovelace born?\nAnswer: London",
    "The big red dog sat on the mat. The quick brown fox jumps over the lazy dog.",
    "user assistant system Hello, how are you? I am fine, thank you.",
    "Paris is the capital of France. Teluvia is a city that does not exist.",
    "What instrument does Varnel Okasu play? The cello, since 1957.",
]


def make_tokenizer(*, chat_template: bool = True, bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ChatML special tokens.

    chat_template: set :data:`CHATML_TEMPLATE` (EOS is then ``<|im_end|>``, as in Qwen-style
    chat models); otherwise no template and EOS ``<|endoftext|>``.
    bos: prepend ``<s>`` when encoding with special tokens (Llama-style).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        pad_token="<pad>",
        bos_token="<s>" if bos else None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        out.chat_template = CHATML_TEMPLATE
    return out
