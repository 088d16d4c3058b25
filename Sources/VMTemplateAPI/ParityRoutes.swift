import Foundation
import Hummingbird
import NIOCore
import Synchronization
import VMTemplateDistribution
import VMTemplateKit
import VMTemplateOS
import VMTemplateQEMU
import VMTemplateStore

/// The API's routes for what the CLI does besides cloning: a clone's devices, templates made and
/// removed, the store's settings. Each checks the caller's rights as the CLI's file permissions
/// would: what opens host files or spends the host's resources is the owner's (or root's).
extension APIServer {
    func addDeviceRoutes(to router: Router<APIContext>) {
        let store = self.store
        let devices = CloneDevices(store: store)
        router.get("/v1/clones/:id/devices") { _, context -> Response in
            let reference = try Self.parameter("id", of: context)
            let record = try store.findCloneExactly(reference)
            guard context.readableTemplates(in: store)(record.template) else { throw TemplateStore.noCloneExactly(reference) }
            return try Self.json(record.devices ?? [])
        }
        // Hot-plug, as `device add`. Devices by path or tap name name host files and namespaces
        // the server opens with the owner's rights, so the owner's (or root's) alone, as at
        // create; descriptors the caller deposited (`fd`) are the caller's own.
        let deposits = self.deposits
        router.post("/v1/clones/:id/devices") { request, context -> Response in
            let record = try Self.changeableClone(try Self.parameter("id", of: context), by: context, in: store, doing: "add devices to")
            let body = try await Self.decode(DeviceBody.self, from: request)
            try Self.requireOwnDevices(nics: body.nics ?? [], disks: body.disks ?? [], context: context)
            let timeout = Duration.seconds(fractional: try Self.checkedTimeout(body.timeout, default: 10))
            var added = try await deposits.withClaims(uid: context.callerUID) { descriptors in
                let wanted = try DeviceObject.request(nics: body.nics ?? [], disks: body.disks ?? [], descriptors: descriptors)
                guard !wanted.nics.isEmpty || !wanted.disks.isEmpty else {
                    throw VMTemplateError(.invalidArgument, "give at least one device: {\"nics\": [...]} or {\"disks\": [...]}.")
                }
                return try await devices.add(wanted, to: record, timeout: timeout)
            }
            if body.wait == true, let current = store.cloneRecord(record.id) {
                // Not seen in time is no failure of the hot-plug, which is done: the clone's
                // devices_ready (false) and its later clone.devices-ready say the rest.
                _ = try? await DeviceReadiness(store: store).wait(for: current, timeout: timeout)
            }
            added = added.map { device in store.cloneRecord(record.id)?.devices?.first { $0.id == device.id } ?? device }
            return try Self.json(added, status: .created)
        }
        router.delete("/v1/clones/:id/devices/:device") { _, context -> Response in
            let record = try Self.changeableClone(try Self.parameter("id", of: context), by: context, in: store, doing: "remove devices from")
            let id = try Self.parameter("device", of: context)
            guard AttachedDevice.isValidID(id) else {
                throw VMTemplateError(.notFound, "clone \(record.id) has no device '\(TerminalText.escape(String(id.prefix(40))))': device IDs are nic0, disk1...; see GET /v1/clones/\(record.id)/devices.")
            }
            return try Self.json(try await devices.remove(id, from: record))
        }
    }

    func addTemplateRoutes(to router: Router<APIContext>) {
        let store = self.store
        let explicitQEMU = engine.launcher.explicitQEMU
        let creations = self.creations
        router.get("/v1/templates/:name") { _, context -> Response in
            let name = try EntityName(try Self.parameter("name", of: context))
            guard let template = try? store.template(named: name), context.mayRead(template) else {
                // Being made (or failed) through the API: the owner's to see, as it was the owner's
                // to ask for.
                if context.callerIsOwner, let creation = creations.status(of: name.value) {
                    return try Self.json(creation, status: .accepted)
                }
                throw VMTemplateError(.notFound, "no template named '\(name)': see GET /v1/templates.")
            }
            return try Self.json(Self.view(of: template, records: store.clones().records, in: store))
        }
        // A template takes seconds to minutes to make: 202 at once, then template.added (or
        // template.failed with the reason) in the events, from the position the answer names.
        router.post("/v1/templates") { request, context -> Response in
            guard context.callerIsOwner else {
                throw VMTemplateError(.permissionDenied, "only the store's owner or root may create templates: a recipe names host files the server opens, and its guest spends the host's memory.")
            }
            let body = try await Self.decode(CreateTemplateBody.self, from: request)
            let name = try EntityName(body.name)
            for path in [body.recipe.kernel] + [body.recipe.initrd].compactMap({ $0 }) + body.recipe.disks.map(\.path) where !path.hasPrefix("/") {
                throw VMTemplateError(.invalidArgument, "recipe path '\(TerminalText.escape(String(path.prefix(80))))' is relative: through the API every path is absolute (the server has no recipe directory to resolve it from).")
            }
            // What only a combination of keys rules out (ready_commands without the agent...) is
            // the creation's to find: accepted here, then template.failed with the reason, as any
            // other failure of a request the document allows.
            if store.templateExists(name) {
                throw VMTemplateError(.exists, "template '\(name)' exists: remove it first (DELETE /v1/templates/\(name)) or pick another name.")
            }
            if let group = body.group {
                guard (try? EntityName(group, kind: "group")) != nil, group.utf8.count <= 32 else {
                    throw VMTemplateError(.invalidArgument, "group '\(TerminalText.escape(String(group.prefix(40))))' is not a group name: letters, digits, '.', '_' and '-', at most 32.")
                }
                guard getgrnam(group) != nil else {
                    throw VMTemplateError(.notFound, "no group named '\(group)' on this host: create it, or leave group out.")
                }
            }
            let timeout = try body.timeout.map { Duration.seconds(fractional: try Self.checkedTimeout($0, default: 120)) }
            let qemu = try QEMUBinary.probe(path: try QEMUBinary.locate(explicit: explicitQEMU))
            let answer = CreateTemplateAnswer(name: name.value, state: "creating", since: store.events.lastSeq())
            guard creations.begin(answer) else {
                throw VMTemplateError(.limitExceeded, "\(TemplateCreations.limit) templates are being created already (or '\(name)' is one of them): wait for template.added in GET /v1/events.")
            }
            let createRequest = CreateRequest(name: name, recipe: body.recipe, accelerator: body.accel ?? .auto, readyTimeout: timeout, group: body.group)
            let creator = TemplateCreator(store: store, qemu: qemu, kvm: .probe())
            Task {
                do {
                    _ = try await creator.create(createRequest)
                    creations.end(name.value, failure: nil)
                } catch {
                    let reason = String(VMTemplateError.oneLine(error).prefix(200))
                    creations.end(name.value, failure: reason)
                    _ = try? await store.withLock { $0.record(StoreEvent(.templateFailed, template: name.value, reason: reason)) }
                }
            }
            var headers: HTTPFields = [.contentType: "application/json"]
            headers[.location] = "/v1/templates/\(name)"
            return Response(status: .accepted, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: try JSONCoding.encode(answer))))
        }
        // As `vmtemplate pull`, blocking: the answer comes once the template is published (a
        // busybox template from a loopback registry: about a second). A pulled template's
        // template.added follows in the events as a created one's does.
        router.post("/v1/templates/pull") { request, context -> Response in
            guard context.callerIsOwner else {
                throw VMTemplateError(.permissionDenied, "only the store's owner or root may pull templates: a pull spends the host's disk and network, and names files (ca_file, creds_file) the server opens.")
            }
            let body = try await Self.decode(PullBody.self, from: request)
            let reference = try ImageReference(parsing: body.reference)
            let name = try body.name.map { try EntityName($0) }
            var options = RegistryOptions()
            options.plainHTTP = body.plainHTTP ?? false
            for path in [body.caFile, body.credsFile].compactMap({ $0 }) where !path.hasPrefix("/") || path.utf8.count > 4096 {
                throw VMTemplateError(.invalidArgument, "'\(TerminalText.escape(String(path.prefix(80))))' is not an absolute path: ca_file and creds_file are paths on the server's host.")
            }
            options.caFile = body.caFile
            options.credentialsFile = body.credsFile
            let result = try await TemplateDistribution(store: store, explicitQEMU: explicitQEMU).pull(reference, name: name, options: options)
            return try Self.json(result, status: result.existed ? .ok : .created)
        }
        // As `rm-template`: its pool goes with it; its clones only with force=true.
        router.delete("/v1/templates/:name") { request, context -> Response in
            guard context.callerIsOwner else {
                throw VMTemplateError(.permissionDenied, "only the store's owner or root may remove templates.")
            }
            let name = try EntityName(try Self.parameter("name", of: context))
            let force = try Self.booleanQuery("force", request.uri.queryParameters["force"]) ?? false
            // A creation that failed is gone once it is removed.
            if !store.templateExists(name), creations.forget(name.value) {
                return try Self.json(RemovedTemplate(name: name.value, removedClones: []))
            }
            let removed = try await TemplateRemoval(store: store).remove(name, force: force)
            return try Self.json(RemovedTemplate(name: name.value, removedClones: removed.map(\.id)))
        }
    }

    func addSettingsRoutes(to router: Router<APIContext>) {
        let store = self.store
        router.get("/v1/settings") { _, _ -> Response in
            try Self.json(try store.settings())
        }
        // The whole settings, as `settings --json` shows them: an absent or null limit is none.
        router.put("/v1/settings") { request, context -> Response in
            guard context.callerIsOwner else {
                throw VMTemplateError(.permissionDenied, "only the store's owner or root may change the store's limits.")
            }
            let wanted = try await Self.decode(SettingsBody.self, from: request).settings
            return try Self.json(try await store.updateSettings { $0 = wanted })
        }
    }

    /// A timeout in seconds from a body: a second to a day.
    static func checkedTimeout(_ seconds: Double?, default fallback: Double) throws -> Double {
        guard let seconds else { return fallback }
        guard seconds >= CloneRequest.minTimeoutSeconds && seconds <= 86_400 else {
            throw VMTemplateError(.invalidArgument, "timeout must be a number of seconds from \(CloneRequest.minTimeoutSeconds) to 86400.")
        }
        return seconds
    }
}

/// Templates being made through the API, by name: one creation per name, ``limit`` at once (each
/// boots a guest); a failed one is remembered (the last ``keptFailures``) until its name is asked
/// for again or removed, so that `GET /v1/templates/{name}` can say what became of it.
final class TemplateCreations: Sendable {
    static let limit = 2
    static let keptFailures = 64
    private struct State {
        var running: [String: CreateTemplateAnswer] = [:]
        var failed: [CreateTemplateAnswer] = []
    }
    private let state = Mutex(State())

    func begin(_ answer: CreateTemplateAnswer) -> Bool {
        state.withLock { state in
            guard state.running.count < Self.limit, state.running[answer.name] == nil else { return false }
            state.running[answer.name] = answer
            state.failed.removeAll { $0.name == answer.name }
            return true
        }
    }

    /// The creation ended: published, or failed for `reason`.
    func end(_ name: String, failure reason: String?) {
        state.withLock { state in
            guard var answer = state.running.removeValue(forKey: name), let reason else { return }
            answer.state = "failed"
            answer.reason = reason
            state.failed.append(answer)
            if state.failed.count > Self.keptFailures { state.failed.removeFirst() }
        }
    }

    /// What is known of a creation of `name` that has not published a template.
    func status(of name: String) -> CreateTemplateAnswer? {
        state.withLock { $0.running[name] ?? $0.failed.last { $0.name == name } }
    }

    /// Forgets a failed creation (its name removed).
    func forget(_ name: String) -> Bool {
        state.withLock { state in
            let before = state.failed.count
            state.failed.removeAll { $0.name == name }
            return state.failed.count != before
        }
    }
}

/// `POST /v1/clones/{id}/devices`' body.
struct DeviceBody: Decodable, Sendable {
    var nics: [DeviceObject]?
    var disks: [DeviceObject]?
    /// Answer once the guest sees them (``DeviceReadiness``).
    var wait: Bool?
    var timeout: Double?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case nics, disks, wait, timeout
    }

    init(from decoder: any Decoder) throws {
        try JSONCoding.refuseUnknownKeys(decoder, known: CodingKeys.allCases.map(\.rawValue), in: "the device request")
        let c = try decoder.container(keyedBy: CodingKeys.self)
        nics = try c.decodeIfPresent([DeviceObject].self, forKey: .nics)
        disks = try c.decodeIfPresent([DeviceObject].self, forKey: .disks)
        wait = try c.decodeIfPresent(Bool.self, forKey: .wait)
        timeout = try c.decodeIfPresent(Double.self, forKey: .timeout)
        guard (nics?.count ?? 0) + (disks?.count ?? 0) <= MachineSpec.maxHotplugSlots else {
            throw VMTemplateError(.invalidArgument, "at most \(MachineSpec.maxHotplugSlots) devices in one request.")
        }
    }
}

/// `POST /v1/templates`' body: the recipe as `create --recipe` reads it, every path absolute.
struct CreateTemplateBody: Decodable, Sendable {
    var name: String
    var recipe: Recipe
    var accel: AcceleratorChoice?
    var timeout: Double?
    var group: String?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case name, recipe, accel, timeout, group
    }

    init(from decoder: any Decoder) throws {
        try JSONCoding.refuseUnknownKeys(decoder, known: CodingKeys.allCases.map(\.rawValue), in: "the template request")
        let c = try decoder.container(keyedBy: CodingKeys.self)
        name = try c.decode(String.self, forKey: .name)
        recipe = try c.decode(Recipe.self, forKey: .recipe)
        accel = try c.decodeIfPresent(AcceleratorChoice.self, forKey: .accel)
        timeout = try c.decodeIfPresent(Double.self, forKey: .timeout)
        group = try c.decodeIfPresent(String.self, forKey: .group)
    }
}

/// A template being made through the API, or whose making failed: what `POST /v1/templates`
/// answers and `GET /v1/templates/{name}` shows until the template is published.
struct CreateTemplateAnswer: Encodable, Sendable {
    var name: String
    /// `creating` or `failed`.
    var state: String
    /// The events' position when the creation began: follow from there for its outcome.
    var since: UInt64
    /// Why it failed (null while it runs).
    var reason: String?
}

struct RemovedTemplate: Encodable, Sendable {
    var name: String
    var removedClones: [String]

    enum CodingKeys: String, CodingKey {
        case name
        case removedClones = "removed_clones"
    }
}

/// `PUT /v1/settings`' body: the settings, unknown keys refused (a misspelt limit is no limit).
struct SettingsBody: Decodable, Sendable {
    var settings: StoreSettings

    init(from decoder: any Decoder) throws {
        try JSONCoding.refuseUnknownKeys(decoder, known: ["max_clones", "memory_budget_bytes", "over_limit_action", "interval_seconds", "pause_attempts"], in: "the settings")
        settings = try StoreSettings(from: decoder)
    }
}

/// `POST /v1/templates/pull`'s body: `vmtemplate pull`'s argument and options.
struct PullBody: Decodable {
    var reference: String
    var name: String?
    var plainHTTP: Bool?
    var caFile: String?
    var credsFile: String?

    enum CodingKeys: String, CodingKey, CaseIterable {
        case reference, name
        case plainHTTP = "plain_http"
        case caFile = "ca_file"
        case credsFile = "creds_file"
    }

    init(from decoder: any Decoder) throws {
        try JSONCoding.refuseUnknownKeys(decoder, known: CodingKeys.allCases.map(\.rawValue), in: "the pull request")
        let c = try decoder.container(keyedBy: CodingKeys.self)
        reference = try c.decode(String.self, forKey: .reference)
        name = try c.decodeIfPresent(String.self, forKey: .name)
        plainHTTP = try c.decodeIfPresent(Bool.self, forKey: .plainHTTP)
        caFile = try c.decodeIfPresent(String.self, forKey: .caFile)
        credsFile = try c.decodeIfPresent(String.self, forKey: .credsFile)
    }
}
