// Server-Sent Events read from a fetch() Response: EventSource cannot send an Authorization header,
// so the playground reads the stream itself and parses it as the SSE format says (WHATWG HTML,
// "server-sent events"): "field: value" lines, an empty line ends an event, ":" starts a comment.

// Yields {type, data, id} per event; `id` is the last id seen so far (kept across events), which a
// client sends back as Last-Event-ID to resume.
export async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { type: "message", data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // A lone "\r" at the end may be half of a "\r\n" split across chunks: it waits for the next one.
    const lines = buffer.split(/\r\n|\r(?!$)|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (event.data.length) yield { ...event, data: event.data.join("\n") };
        event = { type: "message", data: [], id: event.id };
        continue;
      }
      if (line.startsWith(":")) continue; // a comment: the server's keep-alive
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event.type = text;
      else if (field === "data") event.data.push(text);
      else if (field === "id") event.id = text;
    }
  }
}
