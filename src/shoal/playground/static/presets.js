// Presets from the original GPT-3 playground's examples: few-shot translation, summarizing for a
// child, classification from labelled examples, question answering, and copy variants; and one
// of chat's JSON mode.

import { applyPreset } from "./complete.js";
import { $, el } from "./ui.js";

export const PRESETS = [
  {
    id: "translate", name: "German → English",
    mode: "complete", temperature: 0, max_tokens: 32, stop: ["\n"],
    prompt: "German: Guten Morgen!\nEnglish: Good morning!\n"
      + "German: Wo ist der Bahnhof?\nEnglish: Where is the train station?\n"
      + "German: Ich hätte gern einen Kaffee, bitte.\nEnglish: I would like a coffee, please.\n"
      + "German: Das Wetter ist heute sehr schön.\nEnglish:",
  },
  {
    id: "summarize", name: "Summarize for a second grader",
    mode: "complete", temperature: 0.7, max_tokens: 80, stop: ["\n\n"],
    prompt: "Summarize this for a second-grade student:\n\n"
      + "Jupiter is the fifth planet from the Sun and the largest in the Solar System. It is a gas "
      + "giant with a mass one-thousandth that of the Sun, but two-and-a-half times that of all the "
      + "other planets in the Solar System combined. Jupiter is one of the brightest objects visible "
      + "to the naked eye in the night sky, and has been known to ancient civilizations since before "
      + "recorded history. It is named after the Roman god Jupiter. When viewed from Earth, Jupiter "
      + "can be bright enough for its reflected light to cast visible shadows.\n\nSummary:",
  },
  {
    id: "classify", name: "Tweet sentiment",
    mode: "complete", temperature: 0, max_tokens: 3, stop: ["\n"],
    prompt: "Decide whether a tweet's sentiment is Positive, Neutral or Negative.\n\n"
      + "Tweet: I loved the new Batman movie!\nSentiment: Positive\n\n"
      + "Tweet: My flight got cancelled again. Great, just great.\nSentiment: Negative\n\n"
      + "Tweet: The store opens at 9am tomorrow.\nSentiment: Neutral\n\n"
      + "Tweet: This new phone's battery lasts forever, I'm so happy with it\nSentiment:",
  },
  {
    id: "qa", name: "Q&A",
    mode: "complete", temperature: 0, max_tokens: 40, stop: ["\n"],
    prompt: "I am a highly intelligent question answering bot. If you ask me a question that is "
      + "rooted in truth, I will give you the answer.\n\n"
      + "Q: What is human life expectancy in the United States?\nA: Human life expectancy in the "
      + "United States is 78 years.\n\n"
      + "Q: Who was president of the United States in 1955?\nA: Dwight D. Eisenhower was president "
      + "of the United States in 1955.\n\n"
      + "Q: What is the square root of banana?\nA: Unknown\n\n"
      + "Q: Where were the 1992 Olympics held?\nA:",
  },
  {
    id: "variants", name: "Five product descriptions",
    mode: "complete", temperature: 0.9, max_tokens: 60, n: 5, stop: ["\n\n"],
    prompt: "Write a short, vivid product description for an online shop.\n\n"
      + "Product: a stainless steel water bottle that keeps drinks cold for 24 hours\n"
      + "Description:",
  },
  {
    id: "extract", name: "Extract as JSON",
    mode: "chat", temperature: 0, max_tokens: 120, json: true,
    messages: [
      { role: "system", content: "Extract the facts the user gives as one JSON object." },
      { role: "user", content: "Order #1042: two blue mugs and a teapot, shipped to Lyon on 3 May. "
        + "Give JSON with the keys order, items, city and date." },
    ],
  },
];

export function initPresets() {
  const bar = $("presets");
  for (const p of PRESETS) {
    bar.append(el("button", { type: "button", class: "chip-button", "data-testid": `preset-${p.id}`,
                              text: p.name, onclick: () => applyPreset(p) }));
  }
}
