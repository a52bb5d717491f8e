// Write Offsite backup scripts in JavaScript.
//
// A script is `app.js`: it builds its `info`, implements `run`, and exports
// both with `export const { describe, run } = exportScript({ info, run })`.
// Everything it can do goes through the modules here (params, clock, log,
// archive, files, ssh, scp, secrets); every call is checked against the
// site's grants by the runner, and a refusal throws a HostError with
// kind === 'denied'. `offsite build` bundles it with this SDK and builds
// the component.


// One module per interface, so a script's component imports only the
// interfaces it uses (the bundler drops the rest: "sideEffects": false).
export { HostError } from './lib/error.js';
export { Info, Param, exportScript } from './lib/describe.js';
export { params } from './lib/params.js';
export { clock } from './lib/clock.js';
export { log } from './lib/log.js';
export { archive } from './lib/archive.js';
export { files } from './lib/files.js';
export { ssh } from './lib/ssh.js';
export { scp } from './lib/scp.js';
export { secrets } from './lib/secrets.js';
