// Part of offsite-sdk; see ../index.js.
import * as rawParams from 'offsite:backup/params@0.1.0';
import { HostError, host } from './error.js';

export const params = {
  get: (name) => host(rawParams.get, name) ?? null,
  require(name) {
    const v = host(rawParams.get, name);
    if (v === undefined || v === null || v === '') {
      throw new HostError('not-found', `parameter "${name}" is not set (set it in [params] or with --param ${name}=...)`);
    }
    return v;
  },
};
