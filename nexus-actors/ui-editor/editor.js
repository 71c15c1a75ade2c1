// The Studio's code editor: CodeMirror 6 with its basic setup, the language
// told by the file's extension, and Mod-s handed to the page (Save).
// nexus-actors/build.rs bundles this file with esbuild into the binary,
// served as /static/editor.js; app.js imports it.
import { basicSetup } from "codemirror";
import { EditorView, keymap } from "@codemirror/view";
import { EditorState, Compartment, Prec } from "@codemirror/state";
import { indentWithTab } from "@codemirror/commands";
import { python } from "@codemirror/lang-python";
import { javascript } from "@codemirror/lang-javascript";
import { json } from "@codemirror/lang-json";

function languageOf(path) {
  const name = (path || "").toLowerCase();
  if (name.endsWith(".py")) return python();
  if (/\.(m|c)?js$/.test(name)) return javascript();
  if (name.endsWith(".ts")) return javascript({ typescript: true });
  if (name.endsWith(".jsx") || name.endsWith(".tsx")) return javascript({ jsx: true, typescript: name.endsWith(".tsx") });
  if (name.endsWith(".json")) return json();
  return [];
}

// The editor lives in a shadow root of `parent`: there CodeMirror gives
// its styles to the document as constructed style sheets, which the page's
// Content Security Policy (`style-src 'self'`) allows, where it would
// otherwise add a <style> element, which the policy blocks.
const THEME = EditorView.theme({
  "&": { height: "100%", fontSize: "13px" },
  ".cm-scroller": { fontFamily: "ui-monospace, SFMono-Regular, Menlo, monospace" },
});

// `onSave()` runs on Mod-s, `onRun()` on Mod-Enter, `onDeploy()` on
// Shift-Mod-Enter (ahead of the default keymap's bindings); `onChange(dirty)` whenever the text differs (or no
// longer differs) from what was last loaded or saved.
export function createEditor(parent, { onSave = () => {}, onRun = () => {}, onDeploy = () => {}, onChange = () => {} } = {}) {
  const language = new Compartment();
  let saved = "";
  const root = parent.shadowRoot || parent.attachShadow({ mode: "open" });
  const host = document.createElement("div");
  host.style.height = "100%";
  root.replaceChildren(host);
  const view = new EditorView({
    parent: host,
    root,
    state: EditorState.create({
      doc: "",
      extensions: [
        basicSetup,
        THEME,
        Prec.highest(keymap.of([
          { key: "Mod-s", preventDefault: true, run: () => { onSave(); return true; } },
          { key: "Mod-Enter", preventDefault: true, run: () => { onRun(); return true; } },
          { key: "Shift-Mod-Enter", preventDefault: true, run: () => { onDeploy(); return true; } },
        ])),
        keymap.of([indentWithTab]),
        language.of([]),
        EditorView.updateListener.of((update) => {
          if (update.docChanged) onChange(update.state.doc.toString() !== saved);
        }),
      ],
    }),
  });
  return {
    view,
    // Shows `text` as the file at `path`, as saved.
    load(text, path) {
      saved = text;
      view.dispatch({
        changes: { from: 0, to: view.state.doc.length, insert: text },
        effects: language.reconfigure(languageOf(path)),
        selection: { anchor: 0 },
      });
      onChange(false);
    },
    text: () => view.state.doc.toString(),
    // The text now is what the server has.
    markSaved(text) {
      saved = text;
      onChange(view.state.doc.toString() !== saved);
    },
    focus: () => view.focus(),
    // The whole editing state (text, selection, undo history) and the text
    // last saved, to put back with restore() when a tab comes back.
    snapshot: () => ({ state: view.state, saved }),
    restore(snapshot) {
      saved = snapshot.saved;
      view.setState(snapshot.state);
      onChange(view.state.doc.toString() !== saved);
    },
  };
}
