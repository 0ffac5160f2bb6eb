# Sourced by scripts/serve and scripts/test: a .venv with roomcast installed editable,
# reinstalled only when pyproject.toml changed since (code changes need no reinstall).
# pip's and setuptools' chatter goes to a log that is shown only if the install fails.
venv_with_roomcast() {
    local spec=$1 stamp want log
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    stamp=".venv/.installed-$(echo "$spec" | tr -c 'a-z\n' '_')"
    want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
    if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
        return 0
    fi
    # roomcast itself (".") is in every install of it with extras.
    if [[ $spec == . ]] && grep -qxF "$want" .venv/.installed-* 2>/dev/null; then
        return 0
    fi
    echo "${0##*/}: installing $spec into .venv"
    log=$(mktemp)
    if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e "$spec"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
    echo "$want" >"$stamp"
}
