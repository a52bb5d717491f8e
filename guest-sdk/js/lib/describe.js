// Part of offsite-sdk; see ../index.js.
import { HostError } from "./error.js";

/** A parameter: `Param.required('path', 'what to archive')`,
 * `Param.optional('format', 'pattern', { default: '%Y%m%d' })`. */
export const Param = {
  required: (name, description, { secret = false } = {}) => ({ name, description, required: true, default: undefined, secret }),
  optional: (name, description, { default: dflt, secret = false } = {}) => ({
    name, description, required: false, default: dflt, secret,
  }),
};

/** What a script says about itself (`offsite inspect` shows it). */
export function Info(name, version, description = '', { params = [], capabilities = [] } = {}) {
  return { name, version, description, params, capabilities };
}

/** The `describe` and `run` exports for `script` ({ info, run }). Whatever
 * leaves `run` fails the run with one line. */
export function exportScript(script) {
  noNetwork();
  return {
    describe: () => script.info,
    run: () => {
      try {
        script.run();
      } catch (e) {
        // One line for cron mail: the message's lines joined, no stack.
        const text = e instanceof HostError ? e.message : e instanceof Error ? `${e.name}: ${e.message}` : String(e);
        throw text.split(/\r?\n/).filter((l) => l.trim() !== '').join('; ');
      }
    },
  };
}

/** A script has no network. The engine's own `fetch` would stop the
 * component with a bare "unreachable" trap; this one says why. */
function noNetwork() {
  const refuse = () => {
    throw new Error('fetch is not available: scripts have no network (reach hosts with ssh and scp)');
  };
  Object.defineProperty(globalThis, 'fetch', { value: refuse, writable: true, configurable: true });
}
