// torchvlm web chat: sends the conversation to /v1/chat/completions with stream: true and renders the
// SSE chunks as they arrive. Model output is always inserted as text (textContent), never as HTML.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const log = $("log"), prompt = $("prompt"), fileInput = $("image"), preview = $("preview");
  const keyInput = $("api-key"), status = $("status"), sendButton = $("send");
  let history = [];          // OpenAI-style messages of this conversation
  let pendingImage = null;   // data URI of the image attached to the next message
  let model = null;

  keyInput.value = sessionStorage.getItem("torchvlm-api-key") || "";
  keyInput.addEventListener("change", () => { sessionStorage.setItem("torchvlm-api-key", keyInput.value); loadModel(); });

  function headers() {
    const h = { "Content-Type": "application/json" };
    if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
    return h;
  }

  async function errorText(resp) {
    try { const body = await resp.json(); return body.error && body.error.message || resp.statusText; }
    catch (e) { return resp.status + " " + resp.statusText; }
  }

  async function loadModel() {
    try {
      const resp = await fetch("/v1/models", { headers: headers() });
      if (!resp.ok) { status.textContent = "models: " + await errorText(resp); return; }
      const body = await resp.json();
      model = body.data[0].id;
      $("model-name").textContent = model;
      status.textContent = "";
    } catch (e) { status.textContent = "cannot reach the server"; }
  }

  function setImage(file) {
    if (!file) return;
    const reader = new FileReader();
    reader.onload = () => {
      pendingImage = reader.result;
      preview.replaceChildren();
      const img = document.createElement("img");
      img.src = pendingImage; img.alt = "attached image";
      preview.appendChild(img);
    };
    reader.readAsDataURL(file);
  }
  fileInput.addEventListener("change", () => setImage(fileInput.files[0]));
  prompt.addEventListener("paste", (ev) => {
    for (const item of ev.clipboardData ? ev.clipboardData.items : []) {
      if (item.kind === "file" && item.type.startsWith("image/")) { setImage(item.getAsFile()); ev.preventDefault(); }
    }
  });
  prompt.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  $("clear").addEventListener("click", () => { history = []; log.replaceChildren(); });

  function bubble(role, text, image) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    if (image) { const img = document.createElement("img"); img.src = image; img.alt = "image"; div.appendChild(img); }
    const span = document.createElement("span");
    span.className = "text";
    span.textContent = text;
    div.appendChild(span);
    log.appendChild(div);
    return span;
  }

  $("composer").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = prompt.value.trim();
    if (!text && !pendingImage) return;
    if (!model) await loadModel();
    const content = [];
    if (pendingImage) content.push({ type: "image_url", image_url: { url: pendingImage } });
    content.push({ type: "text", text: text });
    bubble("user", text, pendingImage);
    history.push({ role: "user", content: content });
    prompt.value = ""; pendingImage = null; preview.replaceChildren(); fileInput.value = "";
    const answer = bubble("assistant", "");
    answer.parentElement.id = "answer-" + history.length;
    answer.parentElement.classList.add("answer");
    sendButton.disabled = true;
    status.textContent = "generating...";
    let full = "", chunks = 0;
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(),
        body: JSON.stringify({
          model: model, messages: history, stream: true,
          max_tokens: parseInt($("max-tokens").value, 10) || 256,
          temperature: parseFloat($("temperature").value) || 0,
        }),
      });
      if (!resp.ok) throw new Error(await errorText(resp));
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "", done = false;
      while (!done) {
        const chunk = await reader.read();
        if (chunk.done) break;
        buffer += decoder.decode(chunk.value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {       // one SSE event per blank-line-separated block
          const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          for (const line of block.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") { done = true; break; }
            const obj = JSON.parse(data);
            if (obj.error) throw new Error(obj.error.message);
            for (const c of obj.choices || []) {
              if (c.delta && c.delta.content) {
                full += c.delta.content; chunks += 1;
                answer.textContent = full;
                answer.parentElement.dataset.chunks = String(chunks);
              }
            }
          }
        }
      }
      history.push({ role: "assistant", content: full });
      answer.parentElement.dataset.done = "true";
      status.textContent = "";
    } catch (e) {
      answer.parentElement.classList.add("error");
      answer.textContent = "error: " + e.message;
      history.pop();
      status.textContent = "";
    } finally {
      sendButton.disabled = false;
    }
  });

  loadModel();
})();
