//! Bundles the Studio's code editor (`ui-editor/editor.js` and CodeMirror
//! from `ui-editor/node_modules`) with esbuild into `$OUT_DIR/editor.js`,
//! which the binary embeds and serves as `/static/editor.js`. The bundle is
//! build output: never committed.
//!
//! `npm ci --prefix nexus-actors/ui-editor` installs what this needs;
//! `scripts/dev` and `scripts/test` run it. Without it a build outside CI
//! embeds a module that says so in the page (and warns here); under
//! `CI=true` the build fails instead.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("ui-editor");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("editor.js");
    for watched in ["editor.js", "package.json", "package-lock.json", "node_modules/.package-lock.json"] {
        println!("cargo:rerun-if-changed={}", dir.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=CI");
    let esbuild = dir.join("node_modules/.bin/esbuild");
    if !esbuild.exists() {
        let why = "the Studio's code editor is not built: run `npm ci --prefix nexus-actors/ui-editor` \
                   (scripts/dev and scripts/test do), then build again";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        println!("cargo:warning={why}");
        let fallback = format!("export function createEditor() {{ throw new Error({why:?}); }}\n");
        std::fs::write(&out, fallback).expect("OUT_DIR is writable");
        return;
    }
    let status = Command::new(&esbuild)
        .current_dir(&dir)
        .args(["editor.js", "--bundle", "--format=esm", "--minify", "--log-level=warning"])
        .arg(format!("--outfile={}", out.display()))
        .status()
        .expect("esbuild runs");
    assert!(status.success(), "esbuild failed to bundle ui-editor/editor.js");
}
