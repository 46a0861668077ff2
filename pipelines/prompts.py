"""Prompt formats, the step separator, and step splitting of completions.

Formats (PromptConfig.format):
- "lines":      one reasoning step per line, then a final line "The answer is N." Step separator: "\\n".
- "paragraphs": one step per paragraph (blank line between steps), same final line. Separator: "\\n\\n".
- "staged":     LLaVA-o1's stages without the image caption: <SUMMARY>..</SUMMARY>, <REASONING>..</REASONING>
                (one step per line), <CONCLUSION>..</CONCLUSION>. Steps are the reasoning lines plus the conclusion.
Code problems (kind "code") get a code prompt whatever the format: the completion is one step (the program).

The prompt text is the chat template of the model applied to a system and a user message, with the generation
prompt added, so a continuation from a step prefix is simply `prompt + "".join(step + sep for step in prefix)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipelines.config import help_field

FORMATS = ("lines", "paragraphs", "staged")

_SYSTEM = {
    "lines": ("You are a careful math tutor. Solve the problem step by step. Write one calculation per line, "
              "like '12 + 5 = 17'. On the last line write 'The answer is N.' where N is the final number."),
    "paragraphs": ("You are a careful math tutor. Solve the problem step by step, one step per paragraph, with a "
                   "blank line between steps. End with a paragraph 'The answer is N.' where N is the final answer."),
    "staged": ("You are a careful math tutor. Answer in three stages: <SUMMARY> a one-sentence plan </SUMMARY>, "
               "<REASONING> one calculation per line </REASONING>, <CONCLUSION> The answer is N. </CONCLUSION>"),
}
_CODE_SYSTEM = ("You are an expert Python programmer. Complete the function. Reply with the whole function in one "
                "```python code block and nothing else.")

_EXAMPLE = {
    "lines": ("Sam has 4 pens. He buys 3 more pens. How many pens does Sam have now?",
              "Sam starts with 4 pens.\n4 + 3 = 7\nThe answer is 7."),
    "paragraphs": ("Sam has 4 pens. He buys 3 more pens. How many pens does Sam have now?",
                   "Sam starts with 4 pens.\n\n4 + 3 = 7\n\nThe answer is 7."),
    "staged": ("Sam has 4 pens. He buys 3 more pens. How many pens does Sam have now?",
               "<SUMMARY> Add the pens he buys to the pens he has. </SUMMARY>\n<REASONING>\n4 + 3 = 7\n"
               "</REASONING>\n<CONCLUSION> The answer is 7. </CONCLUSION>"),
}


@dataclass(frozen=True)
class PromptConfig:
    format: str = help_field("lines", "step layout: lines | paragraphs | staged")
    system: str = help_field("", "system prompt; empty = the built-in one for the format")
    few_shot: bool = help_field(True, "prepend one worked example (user/assistant turn) in the format")

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format {self.format!r} is not one of {list(FORMATS)}")


def separator(fmt: str) -> str:
    """The text that ends a step (and where step-level generation stops)."""
    return "\n\n" if fmt == "paragraphs" else "\n"


def messages(question: str, kind: str, cfg: PromptConfig) -> list[dict[str, str]]:
    if kind == "code":
        return [{"role": "system", "content": _CODE_SYSTEM}, {"role": "user", "content": question}]
    msgs = [{"role": "system", "content": cfg.system or _SYSTEM[cfg.format]}]
    if cfg.few_shot:
        q, a = _EXAMPLE[cfg.format]
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": question})
    return msgs


def render(tokenizer, question: str, kind: str, cfg: PromptConfig) -> str:
    """The prompt text: the tokenizer's chat template over `messages(...)`, generation prompt added."""
    return tokenizer.apply_chat_template(messages(question, kind, cfg), tokenize=False, add_generation_prompt=True)


_STAGE = re.compile(r"<(SUMMARY|REASONING|CONCLUSION)>(.*?)(?:</\1>|$)", re.S)


def split_steps(completion: str, fmt: str, kind: str = "numeric") -> list[str]:
    """A completion -> its steps (stripped, non-empty). Code completions are a single step."""
    text = completion.strip()
    if not text:
        return []
    if kind == "code":
        return [text]
    if fmt == "staged":
        stages = {name: body for name, body in _STAGE.findall(text)}
        if stages:
            steps = [s.strip() for s in stages.get("REASONING", "").split("\n") if s.strip()]
            if stages.get("CONCLUSION", "").strip():
                steps.append(stages["CONCLUSION"].strip())
            return steps
        # The model ignored the stage tags: fall back to lines rather than losing the solution.
    sep = separator(fmt)
    return [s.strip() for s in text.split(sep) if s.strip()]


def reference_completion(steps: list[str], answer: str, fmt: str) -> str:
    """A problem's reference solution (its steps and final answer) written as the format asks a completion to be:
    what STaR's `rationalize=reference` trains on where the model cannot rationalize by itself."""
    body = [s.strip() for s in steps if s.strip()]
    final = f"The answer is {answer}."
    if fmt == "staged":
        return "<REASONING>\n" + "".join(s + "\n" for s in body) + f"</REASONING>\n<CONCLUSION> {final} </CONCLUSION>"
    return separator(fmt).join(body + [final])


def join_steps(steps: list[str], fmt: str) -> str:
    """Steps -> the text a continuation starts from (each step followed by the separator)."""
    sep = separator(fmt)
    return "".join(s + sep for s in steps)
