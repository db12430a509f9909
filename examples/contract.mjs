// The Palisade contract as exported by `palisade schema export --out DIR`:
//   DIR/schemas/<Type>.json   JSON Schema (2020-12) of the full envelope of each message type
//   DIR/schemas/AuditRecord.json
//   DIR/asyncapi.yaml         AsyncAPI 3.0: which exchange and routing key each type travels on
// Nothing here is Python: any language with a JSON Schema validator and an AMQP client will do.

import { readFile } from "node:fs/promises";
import path from "node:path";

import Ajv2020 from "ajv/dist/2020.js";
import addFormats from "ajv-formats";
import { load as loadYaml } from "js-yaml";

export class ContractError extends Error {}

export class Contract {
  constructor(dir, asyncapi) {
    this.dir = dir;
    this.asyncapi = asyncapi;
    this.ajv = new Ajv2020({ allErrors: true, strict: false });
    addFormats(this.ajv);
    this.validators = new Map();
    this.schemas = new Map();
  }

  static async load(dir) {
    const text = await readFile(path.join(dir, "asyncapi.yaml"), "utf8");
    return new Contract(dir, loadYaml(text));
  }

  /** A validating function for one type's envelope (or "AuditRecord"). */
  async validator(type) {
    if (!this.validators.has(type)) {
      let schema;
      try {
        schema = JSON.parse(await readFile(path.join(this.dir, "schemas", `${type}.json`), "utf8"));
      } catch (err) {
        throw new ContractError(`no schema for ${type} in ${this.dir}/schemas (${err.code ?? err.message})`);
      }
      this.schemas.set(type, schema);
      this.validators.set(type, this.ajv.compile(schema));
    }
    return this.validators.get(type);
  }

  /** The envelope version of a type (its schema pins it with `const`). */
  async version(type) {
    await this.validator(type);
    return this.schemas.get(type).properties?.version?.const ?? 1;
  }

  /** Errors of `value` against the schema of `type`, as readable lines; empty when valid. */
  async errors(type, value) {
    const validate = await this.validator(type);
    if (validate(value)) return [];
    return validate.errors.map((e) => `${e.instancePath || "/"} ${e.message}${e.params ? " " + JSON.stringify(e.params) : ""}`);
  }

  /** Where a message type is published: {exchange, routingKey, version} from the AsyncAPI channels. */
  route(type) {
    for (const channel of Object.values(this.asyncapi.channels ?? {})) {
      if (channel.messages && type in channel.messages && !channel.address.includes("{")) {
        return { exchange: channel.bindings.amqp.exchange.name, routingKey: channel.address };
      }
    }
    throw new ContractError(`${type} is not a message type of this contract`);
  }
}

/** `--name value` pairs and bare `--flag`s into an object. */
export function parseArgs(argv, defaults = {}) {
  const out = { ...defaults };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (!arg.startsWith("--")) throw new ContractError(`unexpected argument ${arg}`);
    const key = arg.slice(2);
    const next = argv[i + 1];
    if (next === undefined || next.startsWith("--")) out[key] = true;
    else {
      out[key] = next;
      i++;
    }
  }
  return out;
}
