"""The tokenizer class names transformers 4.x's AutoTokenizer resolves (torch-free data, no imports).

optimum-onnx pins transformers < 4.58, whose `AutoTokenizer.from_pretrained` reads `tokenizer_config.json`'s
`tokenizer_class` and resolves it by name (`tokenization_auto.tokenizer_class_from_name`): first NAME + "Fast" (for a
name not ending in Fast), then NAME itself, among `TOKENIZER_MAPPING_NAMES`' classes and `PreTrainedTokenizerFast`;
an unknown name fails ("Tokenizer class ... does not exist or is not currently imported"). transformers 5 saves
names 4.x lacks, e.g. "TokenizersBackend" for a plain tokenizers-backed tokenizer.

TRANSFORMERS_4_TOKENIZERS: every tokenizer class name in transformers 4.57.1's `models/auto/tokenization_auto.py`
TOKENIZER_MAPPING_NAMES, plus PreTrainedTokenizer and PreTrainedTokenizerFast (extracted from the released wheel).
"""

from __future__ import annotations

__all__ = ["TRANSFORMERS_4_TOKENIZERS", "legacy_resolves"]

TRANSFORMERS_4_TOKENIZERS = frozenset("""
AlbertTokenizer AlbertTokenizerFast BartTokenizer BartTokenizerFast BarthezTokenizer BarthezTokenizerFast
BartphoTokenizer BertGenerationTokenizer BertJapaneseTokenizer BertTokenizer BertTokenizerFast BertweetTokenizer
BigBirdTokenizer BigBirdTokenizerFast BioGptTokenizer BlenderbotSmallTokenizer BlenderbotTokenizer
BlenderbotTokenizerFast BloomTokenizerFast ByT5Tokenizer CLIPTokenizer CLIPTokenizerFast CTRLTokenizer
CamembertTokenizer CamembertTokenizerFast CanineTokenizer ClvpTokenizer CodeGenTokenizer CodeGenTokenizerFast
CodeLlamaTokenizer CodeLlamaTokenizerFast CohereTokenizerFast ConvBertTokenizer ConvBertTokenizerFast
CpmAntTokenizer CpmTokenizer CpmTokenizerFast DPRQuestionEncoderTokenizer DPRQuestionEncoderTokenizerFast
DebertaTokenizer DebertaTokenizerFast DebertaV2Tokenizer DebertaV2TokenizerFast DiaTokenizer
DistilBertTokenizer DistilBertTokenizerFast ElectraTokenizer ElectraTokenizerFast ErnieMTokenizer
EsmTokenizer FNetTokenizer FNetTokenizerFast FSMTTokenizer FastSpeech2ConformerTokenizer FlaubertTokenizer
FunnelTokenizer FunnelTokenizerFast GPT2Tokenizer GPT2TokenizerFast GPTNeoXJapaneseTokenizer GPTNeoXTokenizerFast
GPTSanJapaneseTokenizer GPTSw3Tokenizer GemmaTokenizer GemmaTokenizerFast HerbertTokenizer HerbertTokenizerFast
JukeboxTokenizer LEDTokenizer LEDTokenizerFast LayoutLMTokenizer LayoutLMTokenizerFast LayoutLMv2Tokenizer
LayoutLMv2TokenizerFast LayoutLMv3Tokenizer LayoutLMv3TokenizerFast LayoutXLMTokenizer LayoutXLMTokenizerFast
LlamaTokenizer LlamaTokenizerFast LongformerTokenizer LongformerTokenizerFast LukeTokenizer LxmertTokenizer
LxmertTokenizerFast M2M100Tokenizer MBart50Tokenizer MBart50TokenizerFast MBartTokenizer MBartTokenizerFast
MLukeTokenizer MPNetTokenizer MPNetTokenizerFast MT5Tokenizer MT5TokenizerFast MarianTokenizer
MgpstrTokenizer MistralCommonTokenizer MobileBertTokenizer MobileBertTokenizerFast MvpTokenizer
MvpTokenizerFast MyT5Tokenizer NllbTokenizer NllbTokenizerFast OpenAIGPTTokenizer OpenAIGPTTokenizerFast
PLBartTokenizer ParakeetCTCTokenizer PegasusTokenizer PegasusTokenizerFast PerceiverTokenizer PhobertTokenizer
PreTrainedTokenizer PreTrainedTokenizerFast ProphetNetTokenizer Qwen2Tokenizer Qwen2TokenizerFast RagTokenizer
RealmTokenizer RealmTokenizerFast ReformerTokenizer ReformerTokenizerFast RemBertTokenizer RemBertTokenizerFast
RetriBertTokenizer RetriBertTokenizerFast RoCBertTokenizer RoFormerTokenizer RoFormerTokenizerFast
RobertaTokenizer RobertaTokenizerFast SeamlessM4TTokenizer SeamlessM4TTokenizerFast SiglipTokenizer
Speech2Text2Tokenizer Speech2TextTokenizer SpeechT5Tokenizer SplinterTokenizer SplinterTokenizerFast
SqueezeBertTokenizer SqueezeBertTokenizerFast T5Tokenizer T5TokenizerFast TapasTokenizer TapexTokenizer
TransfoXLTokenizer UdopTokenizer UdopTokenizerFast VitsTokenizer Wav2Vec2CTCTokenizer Wav2Vec2PhonemeCTCTokenizer
WhisperTokenizer WhisperTokenizerFast XGLMTokenizer XGLMTokenizerFast XLMProphetNetTokenizer XLMRobertaTokenizer
XLMRobertaTokenizerFast XLMTokenizer XLNetTokenizer XLNetTokenizerFast
""".split())


def legacy_resolves(name: str | None) -> bool:
    """Whether transformers 4.x's AutoTokenizer (use_fast=True, its default) finds a class for `tokenizer_class`
    `name` (None: no class named, 4.x then goes by the model config, which transformers 5 saves alike)."""
    if name is None:
        return True
    return (not name.endswith("Fast") and f"{name}Fast" in TRANSFORMERS_4_TOKENIZERS) or \
        name in TRANSFORMERS_4_TOKENIZERS
