// A small Markdown renderer for the chat page (no dependencies, nothing from a CDN).
// It covers what chat replies use: fenced code blocks (also one still open while a reply
// streams), inline code, headings, bullet and numbered lists, block quotes, bold, italics,
// http(s) links and paragraphs. Everything is HTML-escaped FIRST, so a reply can never
// inject markup: only the tags written below are ever produced.
"use strict";

function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
             .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function renderInline(text) {
  const codes = [];
  let html = escapeHtml(text).replace(/`([^`\n]+)`/g, (_m, code) => {
    codes.push("<code>" + code + "</code>");
    return "\u0000" + (codes.length - 1) + "\u0000";
  });
  html = html
    .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
             '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>')
    .replace(/\*\*(?=\S)([^*\n]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)([^_\n]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/(^|[^*\w])\*(?=[^\s*])([^*\n]*?[^\s*])\*(?!\*)/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_(?=[^\s_])([^_\n]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>");
  return html.replace(/\u0000(\d+)\u0000/g, (_m, i) => codes[Number(i)]);
}

const LIST_ITEM = /^\s*(?:[-*+]|\d+[.)])\s+/;

function renderList(lines) {
  const ordered = /^\s*\d+[.)]\s/.test(lines[0]), tag = ordered ? "ol" : "ul";
  const items = [];
  for (const line of lines) {
    if (LIST_ITEM.test(line)) items.push(line.replace(LIST_ITEM, ""));
    else if (items.length) items[items.length - 1] += "\n" + line.trim();  // continuation
  }
  return "<" + tag + ">" + items.map((item) => "<li>" +
    renderInline(item).replace(/\n/g, "<br>") + "</li>").join("") + "</" + tag + ">";
}

function renderBlock(block) {
  const lines = block.split("\n");
  const heading = /^(#{1,6})\s+(.*)$/.exec(lines[0]);
  if (heading && lines.length === 1) {
    const level = heading[1].length;
    return "<h" + level + ">" + renderInline(heading[2]) + "</h" + level + ">";
  }
  if (lines.every((line) => /^\s*>/.test(line))) {
    return "<blockquote>" + renderText(lines.map((l) => l.replace(/^\s*>\s?/, ""))
                                            .join("\n")) + "</blockquote>";
  }
  if (LIST_ITEM.test(lines[0])) return renderList(lines);
  return "<p>" + lines.map(renderInline).join("<br>") + "</p>";
}

function renderText(text) {  // text without code fences: blocks split by blank lines
  return text.split(/\n\s*\n/).map((block) => block.replace(/^\n+|\s+$/g, ""))
             .filter((block) => block.length).map(renderBlock).join("");
}

function renderMarkdown(source) {
  const text = String(source).replace(/\r\n?/g, "\n");
  const fence = /^```[ \t]*([\w.+#-]*)[^\n]*\n([\s\S]*?)(?:\n```[ \t]*(?:\n|$)|$(?![\s\S]))/gm;
  let html = "", last = 0, match;
  while ((match = fence.exec(text)) !== null) {
    html += renderText(text.slice(last, match.index));
    const language = match[1] ? ' class="language-' + escapeHtml(match[1]) + '"' : "";
    html += "<pre><code" + language + ">" + escapeHtml(match[2]) + "</code></pre>";
    last = fence.lastIndex;
    if (match[0].length === 0) fence.lastIndex++;
  }
  return html + renderText(text.slice(last));
}
