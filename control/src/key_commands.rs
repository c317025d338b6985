//! The key commands `genkey` and `pubkey`, as in `wg`: a new private key, and the public
//! key of one read on stdin.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use anyhow::Context as _;
use tailsk8s_dataplane::key::Key;

/// A base64 key and a newline are 45 bytes; more input than this is not a key.
const MAX_KEY_INPUT: u64 = 1024;

/// `tailsk8s genkey`: a new private key on stdout.
pub fn genkey_command() -> anyhow::Result<()> {
    warn_if_stdout_is_shared_file();
    genkey(&mut std::io::stdout().lock())
}

/// `tailsk8s pubkey`: stdin's private key's public key on stdout.
pub fn pubkey_command() -> anyhow::Result<()> {
    pubkey(&mut std::io::stdin().lock(), &mut std::io::stdout().lock())
}

/// Writes a new private key, base64 and a newline.
pub fn genkey(out: &mut dyn Write) -> anyhow::Result<()> {
    writeln!(out, "{}", Key::generate_private()).context("cannot write the key")?;
    out.flush().context("cannot write the key")
}

/// Reads a base64 private key and writes its public key, base64 and a newline.
pub fn pubkey(input: &mut dyn Read, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut bytes = Vec::with_capacity(64);
    input
        .take(MAX_KEY_INPUT)
        .read_to_end(&mut bytes)
        .context("cannot read the private key from stdin")?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| anyhow::anyhow!("stdin is not a base64 private key: not text"))?;
    let private = Key::from_base64(text).context("stdin is not a base64 private key")?;
    writeln!(out, "{}", private.public_key()).context("cannot write the key")?;
    out.flush().context("cannot write the key")
}

/// Like `wg genkey`: a private key about to land in a file others can read deserves a word.
fn warn_if_stdout_is_shared_file() {
    let stdout = std::io::stdout();
    let Ok(fd) = stdout.as_fd().try_clone_to_owned() else {
        return;
    };
    if let Ok(meta) = std::fs::File::from(fd).metadata() {
        if meta.is_file() && meta.mode() & 0o077 != 0 {
            eprintln!(
                "warning: writing a private key to a file that group or others can read; \
                 consider `umask 077` first"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::one_line;

    #[test]
    fn genkey_then_pubkey_agree_with_the_key_type() {
        let mut private = Vec::new();
        genkey(&mut private).unwrap();
        let text = String::from_utf8(private.clone()).unwrap();
        assert!(text.ends_with('\n') && text.len() == 45, "{text:?}");
        let key = Key::from_base64(&text).unwrap();
        assert_eq!(key, key.clamped());

        let mut public = Vec::new();
        pubkey(&mut private.as_slice(), &mut public).unwrap();
        assert_eq!(
            String::from_utf8(public).unwrap(),
            format!("{}\n", key.public_key())
        );
    }

    #[test]
    fn pubkey_matches_a_known_vector() {
        // RFC 7748 section 6.1: Alice's private and public keys.
        let private =
            Key::from_hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
                .unwrap()
                .to_base64();
        let mut public = Vec::new();
        pubkey(&mut private.as_bytes(), &mut public).unwrap();
        let expected =
            Key::from_hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
                .unwrap();
        assert_eq!(String::from_utf8(public).unwrap(), format!("{expected}\n"));
    }

    #[test]
    fn pubkey_refuses_garbage() {
        for input in [&b""[..], b"hello\n", &[0xff; 44], &[b'A'; 4096]] {
            let mut out = Vec::new();
            let err = pubkey(&mut &input[..], &mut out).unwrap_err();
            assert!(
                one_line(&err).starts_with("stdin is not a base64 private key"),
                "{err:#}"
            );
            assert!(out.is_empty());
        }
    }
}
