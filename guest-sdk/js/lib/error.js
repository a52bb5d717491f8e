// Part of offsite-sdk; see ../index.js.
/** A host call failed: `kind` is the WIT error case (denied, not-found, io,
 * timeout, remote-failed, invalid-argument, limit-exceeded). */
export class HostError extends Error {
  constructor(kind, message) {
    super(`${kind}: ${message}`);
    this.name = 'HostError';
    this.kind = kind;
    this.hostMessage = message;
  }
  get denied() {
    return this.kind === 'denied';
  }
}

export function host(f, ...args) {
  try {
    return f(...args);
  } catch (e) {
    const p = e && e.payload;
    if (p && typeof p.tag === 'string') throw new HostError(p.tag, String(p.val));
    throw e;
  }
}
