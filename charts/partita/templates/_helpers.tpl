{{/* Names, labels and shared fragments. */}}

{{- /* The app name (app.kubernetes.io/name): the chart's, or nameOverride. */}}
{{- define "partita.name" -}}
{{- .Values.nameOverride | default .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- /* The prefix of every object's name: fullnameOverride, else <release>-<name> (the release alone when
it already contains the name). */}}
{{- define "partita.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "partita.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "partita.labels" -}}
app.kubernetes.io/name: {{ include "partita.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "partita.selector" -}}
app.kubernetes.io/name: {{ include "partita.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- /*
A component's container image: (dict "root" $ "image" .Values.<component>.image). The component's own
digest, else its own tag; else, for the global repository, the global digest; else the global tag (or
the chart's appVersion). A digest pins the image (repository@sha256:...); the global digest is not
applied to a component's own repository (it names the global repository's image).
*/}}
{{- define "partita.image" -}}
{{- $global := .root.Values.image -}}
{{- $own := .image | default dict -}}
{{- $repository := $own.repository | default $global.repository -}}
{{- if $own.digest -}}
{{ $repository }}@{{ $own.digest }}
{{- else if $own.tag -}}
{{ $repository }}:{{ $own.tag }}
{{- else if and (not $own.repository) $global.digest -}}
{{ $repository }}@{{ $global.digest }}
{{- else -}}
{{ $repository }}:{{ $global.tag | default .root.Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "partita.imagePullPolicy" -}}
{{- (.image | default dict).pullPolicy | default .root.Values.image.pullPolicy -}}
{{- end -}}

{{- /*
A pod template's labels: the chart's, the component's, then podLabels (global, then the component's).
(dict "root" $ "component" "controller" "values" .Values.controller). podLabels may not replace the
labels the workload selects its pods by.
*/}}
{{- define "partita.podLabels" -}}
{{- include "partita.checkKeys" (dict "what" "podLabels" "map" .root.Values.podLabels) -}}
{{- include "partita.checkKeys" (dict "what" (printf "%s.podLabels" .valuesKey) "map" .values.podLabels) -}}
{{- $labels := merge (dict) ((.values.podLabels) | default dict) (.root.Values.podLabels | default dict) -}}
{{- $selector := include "partita.selector" (dict "root" .root "component" .component) | fromYaml -}}
{{- range $key, $_ := $selector -}}
{{- if hasKey $labels $key -}}
{{- fail (printf "podLabels: %q is the label the %s's pods are selected by (set by the chart); remove it from podLabels" $key $.component) -}}
{{- end -}}
{{- end -}}
{{ include "partita.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- with $labels }}
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{- /* A pod template's annotations (a YAML map, empty when there are none): the chart's own, then
podAnnotations (the component's, then the global ones); the chart's own win.
(dict "root" $ "values" .Values.plugin "own" (dict "checksum/..." "...")). */}}
{{- define "partita.podAnnotations" -}}
{{- include "partita.checkKeys" (dict "what" "podAnnotations" "map" .root.Values.podAnnotations) -}}
{{- include "partita.checkKeys" (dict "what" (printf "%s.podAnnotations" .valuesKey) "map" .values.podAnnotations) -}}
{{- $all := merge (dict) (.own | default dict) ((.values.podAnnotations) | default dict) (.root.Values.podAnnotations | default dict) -}}
{{- with $all -}}
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{- /* A ServiceAccount's annotations (a YAML map, empty when there are none): the component's
serviceAccount.annotations, then the global ones. (dict "root" $ "values" .Values.plugin) */}}
{{- define "partita.serviceAccountAnnotations" -}}
{{- include "partita.checkKeys" (dict "what" "serviceAccount.annotations" "map" .root.Values.serviceAccount.annotations) -}}
{{- include "partita.checkKeys" (dict "what" (printf "%s.serviceAccount.annotations" .valuesKey) "map" (.values.serviceAccount | default dict).annotations) -}}
{{- $all := merge (dict) ((.values.serviceAccount | default dict).annotations | default dict) (.root.Values.serviceAccount.annotations | default dict) -}}
{{- with $all -}}
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{- /*
A container's env: the chart's variables (a YAML list in .env), then the component's `env` values.
(dict "env" (include ...) "extra" .Values.plugin.env "component" "plugin"). A user variable may not
redefine one the chart sets: the chart's value would silently lose (or win, by the order).
*/}}
{{- define "partita.env" -}}
{{- $own := .env | fromYamlArray -}}
{{- $names := dict -}}
{{- range $own -}}
{{- $_ := set $names .name true -}}
{{- end -}}
{{- range $i, $e := .extra -}}
{{- if hasKey $names $e.name -}}
{{- fail (printf "%s.env[%d]: %s is set by the chart (from its own values); set that value instead of overriding the variable" $.component $i $e.name) -}}
{{- end -}}
{{- $_ := set $names $e.name true -}}
{{- end -}}
{{- toYaml (concat $own (.extra | default list)) -}}
{{- end -}}

{{- /* Label and annotation keys are qualified names: [prefix/]name, the prefix a DNS subdomain, the name
up to 63 alphanumerics, -, _, . (dict "what" "plugin.podLabels" "map" .Values.plugin.podLabels) */}}
{{- define "partita.checkKeys" -}}
{{- range $key, $_ := (.map | default dict) -}}
{{- $parts := splitList "/" $key -}}
{{- $name := last $parts -}}
{{- $prefix := ternary (first $parts) "" (eq (len $parts) 2) -}}
{{- if or (gt (len $parts) 2) (not (regexMatch "^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$" $name)) (gt (len $name) 63) (and (eq (len $parts) 2) (or (gt (len $prefix) 253) (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$" $prefix)))) -}}
{{- fail (printf "%s: %q is not a valid key: [prefix/]name, the prefix a DNS subdomain (example.com), the name up to 63 letters, digits, -, _ or . starting and ending with a letter or digit" $.what $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "partita.pluginName" -}}{{ include "partita.fullname" . }}-plugin{{- end -}}
{{- define "partita.controllerName" -}}{{ include "partita.fullname" . }}-controller{{- end -}}
{{- define "partita.webhookName" -}}{{ include "partita.fullname" . }}-webhook{{- end -}}

{{/*
DeviceClass name for a base class (gpu/mig/shared), as driver/api/deviceclasses.py names it:
the shipped names for gpu.partita.dev, else "<base>.<driver without a leading gpu.>".
*/}}
{{- define "partita.className" -}}
{{- $driver := .root.Values.driverName -}}
{{- if eq $driver "gpu.partita.dev" -}}
{{ .base }}.partita.dev
{{- else -}}
{{ .base }}.{{ trimPrefix "gpu." $driver }}
{{- end -}}
{{- end -}}

{{- /*
Checks across values that values.schema.json cannot express with a clear message. Rendered once
(templates/checks.yaml); each failure names the value, why, and the fix.
*/}}
{{- define "partita.checkValues" -}}
{{- $driver := .Values.driverName -}}
{{- range $vendor := list "nvidia.com" "amd.com" "intel.com" -}}
{{- if or (eq $driver $vendor) (hasSuffix (printf ".%s" $vendor) $driver) -}}
{{- fail (printf "driverName %q: names under %s belong to that vendor's own DRA drivers (e.g. gpu.nvidia.com, compute-domain.nvidia.com); Partita's DeviceClasses and ResourceSlices would collide with theirs. Use gpu.partita.dev (the default) or a name under a domain you own" $driver $vendor) -}}
{{- end -}}
{{- end -}}
{{- $ext := ((.Values.deviceClasses | default dict).gpu | default dict).extendedResourceName | default "" -}}
{{- if and $ext (ne .Values.allocationMode "scheduler") -}}
{{- fail (printf "deviceClasses.gpu.extendedResourceName %q needs allocationMode=scheduler: in controller mode kube-scheduler would allocate Partita's GPUs for pods asking for %s, beside Partita's controller (two allocators for one device). Leave it empty in controller mode (rewrite such pods to a ResourceClaim with deviceClassName %s, see docs/migration.md), or set allocationMode=scheduler" $ext $ext (include "partita.className" (dict "root" . "base" "gpu"))) -}}
{{- end -}}
{{- if and $ext (hasPrefix "requests." $ext) -}}
{{- fail (printf "deviceClasses.gpu.extendedResourceName %q must not start with requests. (the ResourceQuota prefix); use e.g. nvidia.com/gpu" $ext) -}}
{{- end -}}
{{- if and $ext (contains "kubernetes.io/" $ext) -}}
{{- fail (printf "deviceClasses.gpu.extendedResourceName %q: names under kubernetes.io are Kubernetes' native resources; use your vendor's domain, e.g. nvidia.com/gpu" $ext) -}}
{{- end -}}
{{- $tls := .Values.webhook.tls | default dict -}}
{{- if or $tls.cert $tls.key $tls.caCert -}}
{{- if not (and $tls.cert $tls.key $tls.caCert) -}}
{{- fail "webhook.tls: cert, key and caCert go together (PEM: the serving certificate for <fullname>-webhook.<namespace>.svc, its private key, and the CA that signed it); set all three or none" -}}
{{- end -}}
{{- if .Values.webhook.certManager.enabled -}}
{{- fail "webhook.tls and webhook.certManager.enabled both supply the webhook's certificate; use one" -}}
{{- end -}}
{{- end -}}
{{- $ref := .Values.webhook.certManager.issuerRef | default dict -}}
{{- if and $ref.name .Values.webhook.certManager.issuer (ne $ref.name .Values.webhook.certManager.issuer) -}}
{{- fail (printf "webhook.certManager.issuer %q and webhook.certManager.issuerRef.name %q disagree; issuer is the older spelling of issuerRef.name: set only issuerRef" .Values.webhook.certManager.issuer $ref.name) -}}
{{- end -}}
{{- if and (eq ($ref.kind | default "Issuer") "ClusterIssuer") (not $ref.name) -}}
{{- fail "webhook.certManager.issuerRef.kind ClusterIssuer needs issuerRef.name (the ClusterIssuer to use); the chart creates a self-signed Issuer only when no issuer is named" -}}
{{- end -}}
{{- end -}}

{{/* The managed device taint Partita's controller owns (driver/api/constants.py; a chart test checks). */}}
{{- define "partita.taintKey" -}}partita.dev/managed{{- end -}}
{{- define "partita.taintValue" -}}controller{{- end -}}
{{- define "partita.taintEffect" -}}NoSchedule{{- end -}}

{{/* "true" when the plugin names its sockets per pod (plugin.uniqueSockets; auto: Kubernetes 1.33+, whose
kubelet keeps several instances of one DRA driver and calls the newest). */}}
{{- define "partita.uniqueSockets" -}}
{{- $u := .Values.plugin.uniqueSockets -}}
{{- if kindIs "bool" $u -}}
{{- $u -}}
{{- else -}}
{{- semverCompare ">=1.33.0-0" .Capabilities.KubeVersion.Version -}}
{{- end -}}
{{- end -}}
