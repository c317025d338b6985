# Sourced by scripts that run cargo. Under sudo, PATH is reset and rustup's cargo (in the
# invoking user's home) is not on it: find it there.
if ! command -v cargo >/dev/null && [[ -n "${SUDO_USER:-}" ]]; then
    user_home=$(getent passwd "$SUDO_USER" | cut -d: -f6)
    export CARGO_HOME="${CARGO_HOME:-$user_home/.cargo}"
    export RUSTUP_HOME="${RUSTUP_HOME:-$user_home/.rustup}"
    export PATH="$CARGO_HOME/bin:$PATH"
fi
