// Part of offsite-sdk; see ../index.js.
import * as rawClock from 'offsite:backup/clock@0.1.0';
import { host } from './error.js';

export const clock = {
  now() {
    const raw = rawClock.now();
    return {
      seconds: raw.seconds,
      nanoseconds: raw.nanoseconds,
      /** strftime `pattern` in `zone` ('local' or 'utc'). */
      format: (pattern, zone = 'local') => host(rawClock.format, raw, pattern, zone),
    };
  },
};
